/*
 * iovmm-netbench: the Linux test guest's network transmit workload (built statically by
 * build-linux-guest.sh into the initramfs as /bin/iovmm-netbench; busybox has no UDP sender).
 *
 * Usage: iovmm-netbench DEST_IP PORT FRAMES SIZE [IFACE]
 *
 * Sends FRAMES UDP datagrams to DEST_IP:PORT, each making an Ethernet frame of SIZE bytes
 * (14 + 20 + 8 header bytes + payload; SIZE is clamped to 60..1514), as fast as the socket
 * accepts them. A full queue (ENOBUFS/EAGAIN) is retried, not counted as sent. Then it waits up
 * to 10 s until IFACE's (default eth0) tx_packets counter has grown by FRAMES, which for
 * virtio-net means the device has completed them. Prints one line:
 *
 *   IOVMM-BENCH {"bench":"net-tx","frames":N,"size":S,"send_ns":T,"drain_ns":D,
 *                "retries":R,"tx_packets":P}
 *
 * send_ns is the guest-measured time of the send loop, drain_ns the time until the counter
 * reached its target (or gave up). Exit status 0 when all frames were sent and completed.
 */
#include <arpa/inet.h>
#include <errno.h>
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

int main(int argc, char **argv)
{
    long long port, frames, size, retries = 0;
    if (argc < 5 || argc > 6 || parse_count(argv[2], 65535, &port) ||
        parse_count(argv[3], 1000000000LL, &frames) || parse_count(argv[4], 65535, &size)) {
        fprintf(stderr, "usage: iovmm-netbench DEST_IP PORT FRAMES SIZE [IFACE]\n");
        return 2;
    }
    const char *iface = argc == 6 ? argv[5] : "eth0";
    size = size < MIN_FRAME ? MIN_FRAME : size > MAX_FRAME ? MAX_FRAME : size;
    int s = open_socket(argv[1], port);
    if (s < 0)
        return 1;
    long long before = tx_packets(iface);
    long long t0 = now_ns();
    long long sent = send_all(s, frames, (size_t)(size - HEADERS), &retries);
    long long t1 = now_ns();
    long long done = tx_packets(iface) - before;
    while (done < sent && now_ns() - t1 < DRAIN_LIMIT_NS) {
        usleep(1000);
        done = tx_packets(iface) - before;
    }
    long long t2 = now_ns();
    printf("IOVMM-BENCH {\"bench\":\"net-tx\",\"frames\":%lld,\"size\":%lld,\"send_ns\":%lld,"
           "\"drain_ns\":%lld,\"retries\":%lld,\"tx_packets\":%lld}\n",
           sent, size, t1 - t0, t2 - t1, retries, done);
    fflush(stdout);
    close(s);
    return sent == frames && done >= sent ? 0 : 1;
}
