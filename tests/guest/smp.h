/*
 * Application processors of the fast test guest: started with INIT-SIPI-SIPI through the local
 * APIC (from ring 3: the APIC page is user-accessible), they come up in ring 3 like the BSP and
 * wait for work handed to them with smp_call().
 */
#ifndef IOVMM_GUEST_SMP_H
#define IOVMM_GUEST_SMP_H

#include "lib.h"

/* Starts CPUs 1..cpus-1 (local APIC ids 1..cpus-1, as iovmm numbers them). NULL once all of
 * them run in ring 3, else why not (cpus above SMP_MAX_CPUS, an AP silent for timeout_ms). */
const char *smp_start(u32 cpus, u64 timeout_ms);
/* CPUs running (1 + the APs started). */
u32 smp_cpus(void);
/* Runs fn(arg) on AP `cpu` (1..smp_cpus()-1), which must be idle. */
void smp_call(u32 cpu, void (*fn)(void *), void *arg);
/* Waits until AP `cpu` has returned from the function smp_call() gave it; false after
 * timeout_ms (the AP is then still busy). */
bool smp_wait(u32 cpu, u64 timeout_ms);
/* This CPU's number (0 = BSP), from its local APIC id. */
u32 smp_cpu_id(void);

#endif
