/* virtio-net scenarios, and the device set-up and frame layout they share (net.c). */
#ifndef IOVMM_GUEST_NET_H
#define IOVMM_GUEST_NET_H

#include "pci.h"
#include "virtio.h"

#define NET_HDR_LEN 12 /* the virtio_net_hdr in front of every frame */
#define RX_QUEUE 0
#define TX_QUEUE 1
#define ETH_P_SEQ 0x88b5    /* the scenarios' frames */
#define ETH_P_MARKER 0x88b6 /* net-stale's marker frame */

/* A virtio-net device with the queues of its first pair. */
struct net_dev {
    struct virtio_dev vd;
    struct dma_ctx dma;
    struct virtq rxq, txq;
    u8 mac[6];
};

/* The net-tx scenario; returns the exit code (see net.c for parameters and the result line). */
int run_net_tx(const struct pci_dev *devs, size_t ndevs);
/* net-rx (receive, loop-back) and net-stale (use after unmap); see rx.c. */
int run_net_rx(const struct pci_dev *devs, size_t ndevs);
int run_net_stale(const struct pci_dev *devs, size_t ndevs);

/* Brings up the virtio-net function `pci` for `iommu`: DMA, transport and features, the RX and
 * TX queues (at most rx_size and tx_size entries; vhost-user back ends start only once both
 * are set up), the MAC (the device's with VIRTIO_NET_F_MAC, else 52:54:00:00:00:01). DRIVER_OK
 * is left to the caller, once its buffers exist. NULL, or why it failed (see dma_exit_status). */
const char *net_open(struct net_dev *n, const struct pci_dev *pci, enum iommu_mode iommu, u16 rx_size,
                     u16 tx_size);
/* Writes a zeroed virtio_net_hdr and an Ethernet header (to broadcast, from `mac`, `ethertype`) at
 * `buf`; returns the frame, which starts with that Ethernet header. */
u8 *net_frame_start(u8 *buf, const u8 *mac, u16 ethertype);
/* Writes frame `seq` of `size` bytes at `buf` (after a zeroed virtio_net_hdr): ETH_P_SEQ to
 * broadcast from `mac`, byte j >= 14 = (u8)(seq * 31 + j); with `seq_layout` (the sequence frame
 * of rx.c) bytes 14..21 hold seq (LE) instead. Returns the frame. */
u8 *net_fill_frame(u8 *buf, const u8 *mac, u64 seq, u64 size, bool seq_layout);

#endif
