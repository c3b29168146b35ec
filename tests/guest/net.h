/* virtio-net scenarios. */
#ifndef IOVMM_GUEST_NET_H
#define IOVMM_GUEST_NET_H

#include "pci.h"

/* The net-tx scenario; returns the exit code (see net.c for parameters and the result line). */
int run_net_tx(const struct pci_dev *devs, size_t ndevs);
/* net-rx (receive, loop-back) and net-stale (use after unmap); see rx.c. */
int run_net_rx(const struct pci_dev *devs, size_t ndevs);
int run_net_stale(const struct pci_dev *devs, size_t ndevs);

#endif
