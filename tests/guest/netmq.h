/* net-mq: multiqueue virtio-net transmit; see netmq.c. */
#ifndef IOVMM_GUEST_NETMQ_H
#define IOVMM_GUEST_NETMQ_H

#include "pci.h"

/* The net-mq scenario; returns the exit code (see netmq.c for parameters and the result line). */
int run_net_mq(const struct pci_dev *devs, size_t ndevs);

#endif
