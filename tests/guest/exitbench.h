/* The exit-bench scenario: the cost of a guest exit that the VMM answers without device work. */
#ifndef IOVMM_GUEST_EXITBENCH_H
#define IOVMM_GUEST_EXITBENCH_H

int run_exit_bench(void);

#endif
