/* Constants shared by the ring-0 stub (assembly) and the ring-3 workload (C). */
#ifndef IOVMM_GUEST_ABI_H
#define IOVMM_GUEST_ABI_H

/* GDT selectors. 0x10/0x18 match the ones the VMM enters with. */
#define SEL_KCODE 0x10
#define SEL_KDATA 0x18
#define SEL_UDATA 0x20
#define SEL_UCODE 0x28
#define SEL_TSS 0x30

/* Ports. */
#define SERIAL_PORT 0x3f8
#define EXIT_PORT 0xf4

/* Exit codes written to EXIT_PORT (the VMM exits with them; keep them below 256). */
#define EXIT_OK 0
#define EXIT_FAILED 1          /* the scenario ran and found a failure */
#define EXIT_USAGE 2           /* bad or missing iovmm.* parameters */
#define EXIT_UNSUPPORTED 3     /* the scenario needs something not present or not implemented */
#define EXIT_EXCEPTION_BASE 0x40 /* + vector: a CPU exception ended the guest */

/* Linux boot_params ("zero page") fields the guest reads. */
#define BOOT_PARAMS_ADDR 0x7000
#define BP_E820_ENTRIES 0x1e8
#define BP_CMD_LINE_PTR 0x228
#define BP_CMDLINE_SIZE 0x238
#define BP_E820_TABLE 0x2d0
#define BP_E820_MAX 128

#define KSTACK_SIZE 0x4000
#define USTACK_SIZE 0x10000
#define USTACK_SHIFT 16 /* log2(USTACK_SIZE) */

/* Application processors (boot.S, smp.c). */
#define SMP_MAX_CPUS 4
#define AP_KSTACK_SIZE 0x1000
#define AP_KSTACK_SHIFT 12
#define AP_TRAMPOLINE 0x10000 /* real-mode entry page below 1 MiB: SIPI vector 0x10 */

#endif
