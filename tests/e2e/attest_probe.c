/* An enclave program using /dev/attestation as any language would: plain file I/O.
 *
 *   attest_probe quote HEX      write HEX (up to 64 bytes, zero-padded) as report data,
 *                               read the quote, print it as hex on one line
 *   attest_probe report HEX     the same with /dev/attestation/report
 *   attest_probe type           print attestation_type
 *   attest_probe key POLICY     print keys/_sgx_POLICY as hex
 *   attest_probe bench N HEX [UNTIL]
 *                               write report data once, read the quote N times,
 *                               print each read's latency and end (CLOCK_MONOTONIC),
 *                               in microseconds; with UNTIL (seconds since the epoch),
 *                               print only once that moment has passed, so that no
 *                               enclave's output or exit falls among the others' reads
 *   attest_probe badwrite       write 10 bytes of report data; exit 0 only if close() fails
 */
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

static void write_report_data(const char *hex) {
    unsigned char data[64] = {0};
    size_t n = strlen(hex);
    if (n % 2 || n > 128) { fprintf(stderr, "report data: up to 128 hex digits\n"); exit(2); }
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hexval(hex[2 * i]), lo = hexval(hex[2 * i + 1]);
        if (hi < 0 || lo < 0) { fprintf(stderr, "report data: not hex\n"); exit(2); }
        data[i] = (unsigned char)(hi << 4 | lo);
    }
    int fd = open("/dev/attestation/user_report_data", O_WRONLY);
    if (fd < 0) { perror("open user_report_data"); exit(1); }
    if (write(fd, data, sizeof data) != (ssize_t)sizeof data) { perror("write user_report_data"); exit(1); }
    if (close(fd) != 0) { perror("close user_report_data"); exit(1); }
}

static size_t read_file(const char *path, unsigned char *buf, size_t cap) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) { fprintf(stderr, "open %s: %s\n", path, strerror(errno)); exit(1); }
    size_t len = 0;
    for (;;) {
        ssize_t r = read(fd, buf + len, cap - len);
        if (r < 0) { fprintf(stderr, "read %s: %s\n", path, strerror(errno)); exit(1); }
        if (r == 0) break;
        len += (size_t)r;
        if (len == cap) { fprintf(stderr, "%s: too large\n", path); exit(1); }
    }
    close(fd);
    return len;
}

static void print_hex(const unsigned char *buf, size_t len) {
    for (size_t i = 0; i < len; i++) printf("%02x", buf[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    static unsigned char buf[1 << 16];
    if (argc == 3 && (!strcmp(argv[1], "quote") || !strcmp(argv[1], "report"))) {
        write_report_data(argv[2]);
        size_t len = read_file(!strcmp(argv[1], "quote") ? "/dev/attestation/quote" : "/dev/attestation/report",
                               buf, sizeof buf);
        print_hex(buf, len);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "type")) {
        size_t len = read_file("/dev/attestation/attestation_type", buf, sizeof buf);
        fwrite(buf, 1, len, stdout);
        printf("\n");
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "key")) {
        char path[128];
        snprintf(path, sizeof path, "/dev/attestation/keys/_sgx_%s", argv[2]);
        print_hex(buf, read_file(path, buf, sizeof buf));
        return 0;
    }
    if ((argc == 4 || argc == 5) && !strcmp(argv[1], "bench")) {
        int n = atoi(argv[2]);
        long *lines = calloc((size_t)(n > 0 ? n : 1), 2 * sizeof(long));
        if (!lines) { perror("calloc"); return 1; }
        write_report_data(argv[3]);
        for (int i = 0; i < n; i++) {
            struct timespec a, b;
            clock_gettime(CLOCK_MONOTONIC, &a);
            read_file("/dev/attestation/quote", buf, sizeof buf);
            clock_gettime(CLOCK_MONOTONIC, &b);
            lines[2 * i] = (b.tv_sec - a.tv_sec) * 1000000L + (b.tv_nsec - a.tv_nsec) / 1000L;
            lines[2 * i + 1] = b.tv_sec * 1000000L + b.tv_nsec / 1000L;
        }
        if (argc == 5) {
            double until = atof(argv[4]);
            struct timespec now;
            clock_gettime(CLOCK_REALTIME, &now);
            double left = until - ((double)now.tv_sec + now.tv_nsec / 1e9);
            if (left > 0) {
                struct timespec pause = {(time_t)left, (long)((left - (double)(time_t)left) * 1e9)};
                nanosleep(&pause, NULL);
            }
        }
        for (int i = 0; i < n; i++) printf("%ld %ld\n", lines[2 * i], lines[2 * i + 1]);
        return 0;
    }
    if (argc == 2 && !strcmp(argv[1], "badwrite")) {
        int fd = open("/dev/attestation/user_report_data", O_WRONLY);
        if (fd < 0) { perror("open"); return 1; }
        if (write(fd, "0123456789", 10) != 10) { perror("write"); return 1; }
        return close(fd) != 0 ? 0 : 1;
    }
    fprintf(stderr, "usage: attest_probe quote|report HEX | type | key POLICY | bench N HEX [UNTIL] | badwrite\n");
    return 2;
}
