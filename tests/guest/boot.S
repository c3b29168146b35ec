/*
 * Ring-0 stub of the iovmm fast test guest.
 *
 * kvm-pvm emulates every ring-0 instruction (~0.7 us each), so this file does the least possible
 * work: everything that can be computed at build time (page tables, GDT, TSS, IDT gate attributes)
 * is data, and ring 0 only loads it, patches two descriptors with addresses, and irets to ring 3
 * with IOPL=3. The whole workload then runs natively in ring 3 (see main.c).
 *
 * Entered by the VMM in 64-bit mode: CS=0x10, DS/ES/SS=0x18, paging on, RSI = boot_params,
 * interrupts off, no IDT. Nothing below 1 MiB is written (the VMM's stack at 0x8ff0 is not used).
 */
#include "abi.h"

    .code64
    .section .text.boot, "ax"
    .globl _start
_start:
    rdtsc
    mov %eax, boot_tsc
    mov %edx, boot_tsc + 4
    mov $kstack_top, %esp

    /* No SMEP/SMAP (exception handlers live on user pages), no TSD (ring 3 uses rdtsc). */
    mov %cr4, %rax
    and $~((1 << 21) | (1 << 20) | (1 << 2)), %rax
    mov %rax, %cr4

    /* Our own page tables: 1 GiB pages above 4 GiB when the CPU has them. */
    mov $0x80000001, %eax
    cpuid
    mov $pml4_low, %eax
    bt $26, %edx
    jnc 1f
    mov $pml4_1g, %eax
1:  mov %rax, %cr3
    mov %eax, boot_cr3

    /* TSS descriptor base (the image is below 16 MiB: base[31:24] stays 0). */
    mov $tss, %eax
    mov %ax, gdt_tss + 2
    shr $16, %eax
    mov %al, gdt_tss + 4

    /* IDT offsets: stub i is at isr_stubs + 16 * i, all below 4 GiB (high dword stays 0). */
    mov $isr_stubs, %eax
    mov $idt, %edi
    mov $32, %ecx
2:  mov %ax, (%rdi)
    mov %eax, %edx
    shr $16, %edx
    mov %dx, 6(%rdi)
    add $16, %eax
    add $16, %edi
    dec %ecx
    jnz 2b

    lgdt gdtr
    lidt idtr
    mov $SEL_TSS, %ax
    ltr %ax

    /* To ring 3: IOPL=3, interrupts off. */
    push $(SEL_UDATA | 3)
    push $ustack_top
    push $0x3002
    push $(SEL_UCODE | 3)
    push $user_entry
    iretq

/* Exception stubs: exactly 16 bytes each (the linker script asserts it). */
.macro ISR vec
    .balign 16
    .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
    .else
    push $0
    .endif
    push $\vec
    jmp isr_common
.endm

    .balign 16
    .globl isr_stubs, isr_stubs_end
isr_stubs:
    .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    ISR \vec
    .endr
    .balign 16
isr_stubs_end:

isr_common:
    /* Frame: vector, error code, rip, cs, rflags, rsp, ss. */
    mov %rsp, %rdi
    and $-16, %rsp
    call exception_report
3:  hlt
    jmp 3b

/*
 * Application processors (smp.c starts them with INIT-SIPI-SIPI). ap_trampoline is copied by
 * ring 3 to AP_TRAMPOLINE (below 1 MiB) and entered there in real mode: it goes straight to long
 * mode (PE and PG set at once) with the image's GDT and page tables. ap_entry64 then loads this
 * CPU's TSS (selector SEL_TSS + 16 * cpu, its base patched by smp.c) and irets to ring 3 at
 * ap_user_entry with the CPU number smp.c left in ap_boot_cpu.
 */
    .code16
    .balign 16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (ap_gdtr - ap_trampoline)
    mov $0x20, %eax             /* CR4.PAE */
    mov %eax, %cr4
    mov $pml4_low, %eax
    mov %eax, %cr3
    mov $0xc0000080, %ecx       /* EFER.LME */
    rdmsr
    or $0x100, %eax
    wrmsr
    mov $0x80000011, %eax       /* PG, ET, PE */
    mov %eax, %cr0
    ljmpl $SEL_KCODE, $ap_entry64
    .balign 8
ap_gdtr:
    .short gdt_end - gdt - 1
    .long gdt
ap_trampoline_end:
    .code64

ap_entry64:
    mov $SEL_KDATA, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov boot_cr3, %eax
    mov %rax, %cr3
    mov ap_boot_cpu, %ebx
    mov %ebx, %eax
    shl $AP_KSTACK_SHIFT, %eax
    lea ap_kstacks(%rax), %rsp
    lidt idtr
    mov %ebx, %eax
    shl $4, %eax
    add $SEL_TSS, %eax
    ltr %ax
    push $(SEL_UDATA | 3)
    mov %ebx, %eax
    shl $USTACK_SHIFT, %eax
    lea ap_ustacks(%rax), %rax
    push %rax
    push $0x3002
    push $(SEL_UCODE | 3)
    push $ap_user_entry
    mov %ebx, %edi
    iretq

/* Ring 3 from here on: native speed. */
    .text
ap_user_entry:
    call ap_main
5:  pause
    jmp 5b

user_entry:
    mov $__bss_start, %edi
    mov $__bss_end, %ecx
    sub %edi, %ecx
    xor %eax, %eax
    rep stosb
    call guest_main
    mov %eax, %edi
    call guest_exit
4:  pause
    jmp 4b

/* ---------------------------------------------------------------- data */

    .section .data.pagetables, "aw"
    .balign 4096
/* Two PML4s sharing everything below 4 GiB; one adds 1 GiB pages for 4..512 GiB. */
pml4_low:
    .quad pdpt_low + 0x27
    .fill 511, 8, 0
pml4_1g:
    .quad pdpt_1g + 0x27
    .fill 511, 8, 0
pdpt_low:
    .quad pd0 + 0x27, pd1 + 0x27, pd2 + 0x27, pd3 + 0x27
    .fill 508, 8, 0
pdpt_1g:
    .quad pd0 + 0x27, pd1 + 0x27, pd2 + 0x27, pd3 + 0x27
    .set addr, 0x100000000
    .rept 508
    .quad addr | 0xe7           /* P RW US A D PS */
    .set addr, addr + 0x40000000
    .endr
/* 0..2 MiB in 4 KiB pages so that page 0 is absent (catches NULL). */
pt0:
    .quad 0
    .set addr, 0x1000
    .rept 511
    .quad addr | 0x67           /* P RW US A D */
    .set addr, addr + 0x1000
    .endr
/* 0..4 GiB in 2 MiB pages; 3..4 GiB (BARs, ECAM, IOAPIC, VT-d, LAPIC) uncached. */
pd0:
    .quad pt0 + 0x27
    .set addr, 0x200000
    .rept 2047
    .if addr < 0xc0000000
    .quad addr | 0xe7
    .else
    .quad addr | 0xff           /* + PWT PCD */
    .endif
    .set addr, addr + 0x200000
    .endr
    .set pd1, pd0 + 0x1000
    .set pd2, pd0 + 0x2000
    .set pd3, pd0 + 0x3000

    .data
    .balign 8
    .globl boot_tsc
boot_tsc:
    .quad 0
boot_cr3:
    .long 0
    .globl ap_boot_cpu
ap_boot_cpu:
    .long 0

    .balign 16
gdt:
    .quad 0
    .quad 0
    .quad 0x00af9a000000ffff    /* 0x10 kernel code, 64-bit */
    .quad 0x00cf92000000ffff    /* 0x18 kernel data */
    .quad 0x00cff2000000ffff    /* 0x20 user data, DPL 3 */
    .quad 0x00affa000000ffff    /* 0x28 user code, 64-bit, DPL 3 */
gdt_tss:                        /* 0x30 64-bit TSS, base patched at boot */
    .quad 0x0000890000000000 + (tss_end - tss - 1)
    .quad 0
    .globl gdt_ap_tss
gdt_ap_tss:                     /* 0x40, 0x50, ...: the APs' TSSs, patched by smp.c */
    .fill 2 * (SMP_MAX_CPUS - 1), 8, 0
gdt_end:

/*
 * The APs' TSSs (128 bytes apart) come right before the BSP's and share its I/O permission
 * bitmap: each one's bitmap offset reaches tss_iopb.
 */
    .balign 128
    .globl ap_tss, tss_end
ap_tss:
    .set cpu, 1
    .rept SMP_MAX_CPUS - 1
    .long 0
    .quad ap_kstacks + cpu * AP_KSTACK_SIZE  /* RSP0 */
    .fill 11, 8, 0
    .short 0
    .short tss_iopb - (. - 102)    /* from this TSS's base */
    .balign 128
    .set cpu, cpu + 1
    .endr
tss:
    .long 0
    .quad kstack_top            /* RSP0 */
    .fill 11, 8, 0              /* RSP1, RSP2, reserved, IST1..7, reserved */
    .short 0
    .short tss_iopb - tss
/*
 * An all-zero I/O permission bitmap: every port is allowed from ring 3 even when IOPL reads as 0.
 * kvm-pvm does not keep the guest's IOPL=3 across exits from native ring 3 (measured: after the
 * first cpuid exit, `out` in ring 3 raised #GP with IOPL=0), so ring-3 port I/O relies on this.
 */
tss_iopb:
    .fill 8192, 1, 0
    .byte 0xff
tss_end:

    .balign 16
    .globl idt, idt_end         /* the triple-fault scenario clears it from ring 3 */
idt:
    .rept 32
    .short 0, SEL_KCODE, 0x8e00, 0  /* offset patched at boot; interrupt gate, DPL 0 */
    .long 0, 0
    .endr
idt_end:

    .balign 8
    .short 0, 0, 0
gdtr:
    .short gdt_end - gdt - 1
    .quad gdt
    .short 0, 0, 0
idtr:
    .short idt_end - idt - 1
    .quad idt

    .section .stack, "aw", @nobits
    .balign 16
    .space KSTACK_SIZE
kstack_top:
    .space USTACK_SIZE
    .globl ustack_top
ustack_top:
    .balign 4096
ap_kstacks:                     /* CPU n's stack top is ap_kstacks + n * size (n >= 1) */
    .space AP_KSTACK_SIZE * (SMP_MAX_CPUS - 1)
ap_ustacks:
    .space USTACK_SIZE * (SMP_MAX_CPUS - 1)

    .section .note.GNU-stack, "", @progbits
