/*
 * iovmm-netbench: the Linux test guest's network transmit workload (built statically by
 * build-linux-guest.sh into the initramfs as /bin/iovmm-netbench; busybox has no UDP sender).
 *
 * Usage: iovmm-netbench DEST_IP PORT FRAMES SIZE [IFACE]
 *        iovmm-netbench --rx FRAMES SIZE IFACE
 *
 * Sends FRAMES UDP datagrams to DEST_IP:PORT, each making an Ethernet frame of SIZE bytes
 * (14 + 20 + 8 header bytes + payload; SIZE is clamped to 60..1514), as fast as the socket
 * accepts them. A full queue (ENOBUFS/EAGAIN) is retried, not counted as sent. Then it waits up
 * to 10 s until IFACE's (default eth0) tx_packets counter has grown by FRAMES, which for
 * virtio-net means the device has completed them. Prints one line:
 *
 *   IOVMM-BENCH {"bench":"net-tx","frames":N,"size":S,"send_ns":T,"drain_ns":D,
 *                "retries":R,"tx_packets":P,"qdisc":"K","qdisc_drops":Q,"qdisc_overlimit":O}
 *
 * With IOVMM_SPREAD_CPUS=N in the environment (the guest init sets it from iovmm.tx_cpus=N) the
 * frames go out in N equal parts, part k from CPU k on a socket of its own: virtio-net maps CPU k
 * to TX queue k (XPS), so with N queue pairs every queue carries a part.
 *
 * send_ns is the guest-measured time of the send loop, drain_ns the time until the counter
 * reached its target (or gave up). qdisc is the kind of IFACE's root queueing discipline and
 * qdisc_drops the frames it dropped during the run (read over rtnetlink, -1 if unreadable): a
 * frame the socket accepted but the device never saw was dropped there (fq_codel's AQM drops a
 * UDP flow's packets once they queue longer than its 5 ms target; qdisc_overlimit counts those
 * dropped because the queue was full instead). Exit status 0 when all frames were sent and
 * completed.
 *
 * --rx receives FRAMES sequence frames of SIZE bytes from the test back end's generator
 * (tests/src/backend/rxgen.rs: broadcast, ethertype 0x88b5, little-endian u64 sequence number at
 * frame offset 14, then byte j = seq * 31 + j) on a packet socket opened before IFACE is brought
 * up, checks their order, length and every byte, and prints
 *
 *   IOVMM-BENCH {"bench":"net-rx","frames":N,"size":S,"received":R,"bad":B,"drops":D,"recv_ns":T}
 *
 * drops is the socket's own drop count (PACKET_STATISTICS). It gives up 10 s after the last frame.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <sched.h>
#include <linux/if_packet.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <linux/gen_stats.h>
#include <linux/netlink.h>
#include <linux/pkt_sched.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEADERS 42
#define MIN_FRAME 60
#define MAX_FRAME 1514
#define DRAIN_LIMIT_NS 10000000000LL

static long long now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

/* The interface's tx_packets counter, or -1 if it cannot be read. */
static long long tx_packets(const char *iface)
{
    char path[128];
    long long v = -1;
    snprintf(path, sizeof(path), "/sys/class/net/%s/statistics/tx_packets", iface);
    FILE *f = fopen(path, "r");
    if (!f)
        return -1;
    if (fscanf(f, "%lld", &v) != 1)
        v = -1;
    fclose(f);
    return v;
}

/* Counters of an interface's root qdisc. */
struct qdisc_stats {
    char kind[16];
    long long drops;
    long long overlimit;
};

static void qdisc_attrs(struct tcmsg *tc, int len, struct qdisc_stats *q)
{
    for (struct rtattr *a = TCA_RTA(tc); RTA_OK(a, len); a = RTA_NEXT(a, len)) {
        if (a->rta_type == TCA_KIND)
            snprintf(q->kind, sizeof(q->kind), "%.*s", (int)RTA_PAYLOAD(a), (char *)RTA_DATA(a));
        if (a->rta_type == TCA_STATS2) {
            int l2 = RTA_PAYLOAD(a);
            for (struct rtattr *b = RTA_DATA(a); RTA_OK(b, l2); b = RTA_NEXT(b, l2)) {
                if (b->rta_type == TCA_STATS_QUEUE &&
                    RTA_PAYLOAD(b) >= sizeof(struct gnet_stats_queue))
                    q->drops = ((struct gnet_stats_queue *)RTA_DATA(b))->drops;
                if (b->rta_type == TCA_STATS_APP &&
                    RTA_PAYLOAD(b) >= sizeof(struct tc_fq_codel_xstats) && !strcmp(q->kind, "fq_codel"))
                    q->overlimit =
                        ((struct tc_fq_codel_xstats *)RTA_DATA(b))->qdisc_stats.drop_overlimit;
            }
        }
    }
}

/* Reads IFACE's root qdisc counters over rtnetlink; drops stays -1 when that fails. */
static struct qdisc_stats root_qdisc(const char *iface)
{
    struct qdisc_stats q = {"?", -1, -1};
    int ifindex = (int)if_nametoindex(iface);
    int s = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
    if (s < 0 || !ifindex)
        goto out;
    struct {
        struct nlmsghdr nh;
        struct tcmsg tc;
    } req = {
        .nh = {.nlmsg_len = sizeof(req), .nlmsg_type = RTM_GETQDISC,
               .nlmsg_flags = NLM_F_REQUEST | NLM_F_DUMP},
        .tc = {.tcm_family = AF_UNSPEC, .tcm_ifindex = ifindex},
    };
    if (send(s, &req, sizeof(req), 0) < 0)
        goto out;
    static char buf[32768];
    for (;;) {
        ssize_t n = recv(s, buf, sizeof(buf), 0);
        if (n <= 0)
            goto out;
        int len = (int)n;
        for (struct nlmsghdr *h = (struct nlmsghdr *)buf; NLMSG_OK(h, len); h = NLMSG_NEXT(h, len)) {
            if (h->nlmsg_type == NLMSG_DONE || h->nlmsg_type == NLMSG_ERROR)
                goto out;
            struct tcmsg *tc = NLMSG_DATA(h);
            if (h->nlmsg_type == RTM_NEWQDISC && tc->tcm_ifindex == ifindex &&
                tc->tcm_parent == TC_H_ROOT)
                qdisc_attrs(tc, (int)(h->nlmsg_len - NLMSG_LENGTH(sizeof(*tc))), &q);
        }
    }
out:
    if (s >= 0)
        close(s);
    return q;
}

static int parse_count(const char *s, long long max, long long *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || *end || v < 0 || v > max)
        return -1;
    *out = v;
    return 0;
}

static int open_socket(const char *ip, long long port)
{
    struct sockaddr_in dst;
    memset(&dst, 0, sizeof(dst));
    dst.sin_family = AF_INET;
    dst.sin_port = htons((unsigned short)port);
    if (inet_pton(AF_INET, ip, &dst.sin_addr) != 1) {
        fprintf(stderr, "iovmm-netbench: bad IPv4 address '%s'\n", ip);
        return -1;
    }
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&dst, sizeof(dst)) < 0) {
        perror("iovmm-netbench: socket/connect");
        return -1;
    }
    return s;
}

/* Sends `frames` datagrams of `len` bytes; returns how many were sent, counts retries. */
static long long send_all(int s, long long frames, size_t len, long long *retries)
{
    static unsigned char payload[MAX_FRAME];
    long long sent = 0;
    while (sent < frames) {
        memcpy(payload, &sent, sizeof(sent));
        if (send(s, payload, len, 0) == (ssize_t)len) {
            sent++;
        } else if (errno == ENOBUFS || errno == EAGAIN || errno == EINTR) {
            (*retries)++;
            usleep(50);
        } else {
            perror("iovmm-netbench: send");
            break;
        }
    }
    return sent;
}

#define RX_ETHERTYPE 0x88b5
#define RX_IDLE_MS 10000

/* Opens a packet socket for the generator's ethertype, then brings IFACE up. The socket is not
 * bound to IFACE: a socket bound to a device that is down only starts receiving at the device's
 * NETDEV_UP notification, after the driver already passed up the first frames (they would be
 * dropped as an unhandled protocol); an unbound one receives from the moment it exists. */
static int open_rx(const char *iface)
{
    int s = socket(AF_PACKET, SOCK_DGRAM, htons(RX_ETHERTYPE));
    int big = 16 << 20;
    if (s < 0 || !if_nametoindex(iface)) {
        perror("iovmm-netbench: packet socket");
        return -1;
    }
    setsockopt(s, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof(big));
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", iface);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0 || (ifr.ifr_flags |= IFF_UP, ioctl(s, SIOCSIFFLAGS, &ifr) < 0)) {
        perror("iovmm-netbench: bring the interface up");
        return -1;
    }
    return s;
}

/* Whether payload `p` (the frame from offset 14) is sequence frame `seq` of `size` bytes. */
static int rx_frame_ok(const unsigned char *p, long long n, long long seq, long long size)
{
    long long got;
    if (n != size - 14)
        return 0;
    memcpy(&got, p, sizeof(got));
    if (got != seq)
        return 0;
    for (long long j = 22; j < size; j++)
        if (p[j - 14] != (unsigned char)((unsigned char)(seq * 31) + (unsigned char)j))
            return 0;
    return 1;
}

static int run_rx(long long frames, long long size, const char *iface)
{
    static unsigned char buf[MAX_FRAME + 64];
    int s = open_rx(iface);
    if (s < 0)
        return 1;
    long long received = 0, bad = 0, t0 = 0;
    struct pollfd pfd = {.fd = s, .events = POLLIN};
    while (received + bad < frames && poll(&pfd, 1, RX_IDLE_MS) > 0) {
        ssize_t n = recv(s, buf, sizeof(buf), 0);
        if (n < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (n < 0)
            break;
        if (!t0)
            t0 = now_ns();
        if (rx_frame_ok(buf, n, received + bad, size))
            received++;
        else
            bad++;
    }
    long long t1 = now_ns();
    struct tpacket_stats st = {0};
    socklen_t len = sizeof(st);
    long long drops = getsockopt(s, SOL_PACKET, PACKET_STATISTICS, &st, &len) ? -1 : (long long)st.tp_drops;
    printf("IOVMM-BENCH {\"bench\":\"net-rx\",\"frames\":%lld,\"size\":%lld,\"received\":%lld,"
           "\"bad\":%lld,\"drops\":%lld,\"recv_ns\":%lld}\n",
           frames, size, received, bad, drops, t0 ? t1 - t0 : 0);
    fflush(stdout);
    close(s);
    return received == frames ? 0 : 1;
}

int main(int argc, char **argv)
{
    long long port, frames, size, retries = 0;
    if (argc == 5 && !strcmp(argv[1], "--rx")) {
        if (parse_count(argv[2], 1000000000LL, &frames) || parse_count(argv[3], MAX_FRAME, &size) ||
            size < 22) {
            fprintf(stderr, "usage: iovmm-netbench --rx FRAMES SIZE(22..1514) IFACE\n");
            return 2;
        }
        return run_rx(frames, size, argv[4]);
    }
    if (argc < 5 || argc > 6 || parse_count(argv[2], 65535, &port) ||
        parse_count(argv[3], 1000000000LL, &frames) || parse_count(argv[4], 65535, &size)) {
        fprintf(stderr, "usage: iovmm-netbench DEST_IP PORT FRAMES SIZE [IFACE]\n");
        return 2;
    }
    const char *iface = argc == 6 ? argv[5] : "eth0";
    size = size < MIN_FRAME ? MIN_FRAME : size > MAX_FRAME ? MAX_FRAME : size;
    /* IOVMM_SPREAD_CPUS=N (N > 1): send the frames in N equal parts, part k pinned to CPU k on
     * a socket of its own, so that with one TX queue per CPU (virtio-net's XPS) every queue
     * carries a part (a connected socket keeps the queue of its first frame). */
    const char *spread_env = getenv("IOVMM_SPREAD_CPUS");
    long long spread = 1;
    if (spread_env && (parse_count(spread_env, 64, &spread) || spread < 1))
        spread = 1;
    long long before = tx_packets(iface);
    struct qdisc_stats q0 = root_qdisc(iface);
    long long t0 = now_ns();
    long long sent = 0;
    for (long long k = 0; k < spread; k++) {
        long long part = frames / spread + (k < frames % spread ? 1 : 0);
        if (spread > 1) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET((int)k, &set);
            if (sched_setaffinity(0, sizeof(set), &set) < 0)
                perror("iovmm-netbench: sched_setaffinity");
        }
        int s = open_socket(argv[1], port);
        if (s < 0)
            return 1;
        long long n = send_all(s, part, (size_t)(size - HEADERS), &retries);
        close(s);
        sent += n;
        if (n < part)
            break;
    }
    long long t1 = now_ns();
    long long done = tx_packets(iface) - before;
    while (done < sent && now_ns() - t1 < DRAIN_LIMIT_NS) {
        usleep(1000);
        done = tx_packets(iface) - before;
    }
    long long t2 = now_ns();
    struct qdisc_stats q1 = root_qdisc(iface);
    long long qdrops = q0.drops < 0 || q1.drops < 0 ? -1 : q1.drops - q0.drops;
    long long qover = q0.overlimit < 0 || q1.overlimit < 0 ? -1 : q1.overlimit - q0.overlimit;
    printf("IOVMM-BENCH {\"bench\":\"net-tx\",\"frames\":%lld,\"size\":%lld,\"send_ns\":%lld,"
           "\"drain_ns\":%lld,\"retries\":%lld,\"tx_packets\":%lld,\"qdisc\":\"%s\","
           "\"qdisc_drops\":%lld,\"qdisc_overlimit\":%lld}\n",
           sent, size, t1 - t0, t2 - t1, retries, done, q1.kind, qdrops, qover);
    fflush(stdout);
    return sent == frames && done >= sent ? 0 : 1;
}
