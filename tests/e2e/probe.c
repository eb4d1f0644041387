/* probe: checks made from inside an enclave by the end-to-end tests. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <linux/io_uring.h>
#include <linux/netlink.h>
#include <sched.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/ioctl.h>
#include <sys/ptrace.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <termios.h>
#include <unistd.h>

extern char **environ;

static int family_of(const char *name) {
    if (!strcmp(name, "unix")) return AF_UNIX;
    if (!strcmp(name, "inet")) return AF_INET;
    if (!strcmp(name, "inet6")) return AF_INET6;
    if (!strcmp(name, "packet")) return AF_PACKET;
    if (!strcmp(name, "netlink")) return AF_NETLINK;
    if (!strcmp(name, "vsock")) return 40; /* AF_VSOCK */
    return -1;
}

static int report(const char *what, long rc) {
    if (rc < 0) { printf("%s: denied %s\n", what, strerror(errno)); return 1; }
    printf("%s: allowed\n", what);
    return 0;
}

static volatile sig_atomic_t got = 0;
static void on_signal(int sig) { got = sig; }

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: probe CHECK [ARG]\n"); return 2; }
    const char *check = argv[1];
    if (!strcmp(check, "connect")) {
        int fd = socket(AF_INET, SOCK_STREAM, 0);
        if (fd < 0) return report("socket", -1);
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
        inet_pton(AF_INET, "127.0.0.1", &addr.sin_addr);
        return report("connect", connect(fd, (struct sockaddr *)&addr, sizeof addr));
    }
    if (!strcmp(check, "ptrace")) {
        pid_t child = fork();
        if (child == 0) { pause(); _exit(0); }
        long rc = ptrace(PTRACE_ATTACH, child, 0, 0);
        kill(child, SIGKILL);
        return report("ptrace", rc);
    }
    if (!strcmp(check, "unshare")) return report("unshare", unshare(CLONE_NEWUSER));
    if (!strcmp(check, "mount")) return report("mount", mount("none", "/tmp", "tmpfs", 0, NULL));
    if (!strcmp(check, "keyctl")) return report("keyctl", syscall(SYS_keyctl, 0, 0, 0, 0, 0));
    if (!strcmp(check, "bpf")) return report("bpf", syscall(SYS_bpf, 0, 0, 0));
    if (!strcmp(check, "clone-newns")) {
        long rc = syscall(SYS_clone, CLONE_NEWNS | SIGCHLD, 0, 0, 0, 0);
        if (rc == 0) _exit(0);
        if (rc > 0) waitpid(rc, 0, 0);
        return report("clone-newns", rc);
    }
    if (!strcmp(check, "write")) { /* write ARG[3] (default "1") into the file ARG[2] */
        const char *value = argc > 3 ? argv[3] : "1";
        int fd = open(argv[2], O_WRONLY);
        if (fd < 0) return report("write", -1);
        long rc = write(fd, value, strlen(value));
        close(fd);
        return report("write", rc);
    }
    if (!strcmp(check, "read")) { /* how many bytes the file ARG[2] gives */
        int fd = open(argv[2], O_RDONLY);
        if (fd < 0) return report("read", -1);
        char buf[4096];
        long total = 0, n;
        while ((n = read(fd, buf, sizeof buf)) > 0) total += n;
        printf("read: %ld bytes\n", total);
        return 0;
    }
    if (!strcmp(check, "socket")) { /* socket FAMILY: unix inet inet6 packet netlink vsock */
        int family = family_of(argv[2]);
        int type = family == AF_PACKET || family == AF_NETLINK ? SOCK_RAW : SOCK_STREAM;
        return report("socket", socket(family, type, 0));
    }
    if (!strcmp(check, "socket-high-bits")) /* AF_INET with high bits the kernel ignores */
        return report("socket-high-bits", syscall(SYS_socket, 0x100000002UL, SOCK_STREAM, 0));
    if (!strcmp(check, "socketpair")) { /* socketpair FAMILY */
        int fds[2];
        return report("socketpair", socketpair(family_of(argv[2]), SOCK_STREAM, 0, fds));
    }
    if (!strcmp(check, "io_uring")) {
        struct io_uring_params params;
        memset(&params, 0, sizeof params);
        return report("io_uring", syscall(SYS_io_uring_setup, 4, &params));
    }
    if (!strcmp(check, "env")) { for (char **e = environ; *e; e++) puts(*e); return 0; }
    if (!strcmp(check, "alloc")) {
        size_t mb = strtoul(argv[2], 0, 10);
        for (size_t i = 0; i < mb; i++) {
            char *p = malloc(1 << 20);
            if (!p) { printf("alloc: failed at %zu MB\n", i); return 1; }
            memset(p, 1, 1 << 20);
        }
        printf("alloc: %zu MB ok\n", mb);
        return 0;
    }
    if (!strcmp(check, "fork")) {
        int wanted = atoi(argv[2]), made = 0;
        pid_t *pids = calloc(wanted, sizeof *pids);
        for (int i = 0; i < wanted; i++) {
            pid_t pid = fork();
            if (pid == 0) { sleep(5); _exit(0); }
            if (pid < 0) break;
            pids[made++] = pid;
        }
        printf("fork: %d of %d\n", made, wanted);
        for (int i = 0; i < made; i++) { kill(pids[i], SIGKILL); waitpid(pids[i], 0, 0); }
        return 0;
    }
    if (!strcmp(check, "trap")) {
        signal(SIGTERM, on_signal);
        signal(SIGINT, on_signal);
        printf("ready\n");
        fflush(stdout);
        while (!got) pause();
        printf("got signal %d\n", (int)got);
        return 40 + (int)got;
    }
    if (!strcmp(check, "wait")) { printf("ready\n"); fflush(stdout); pause(); return 0; }
    if (!strcmp(check, "exit")) return atoi(argv[2]);
    if (!strcmp(check, "umask")) { mode_t mask = umask(0); printf("%03o\n", (unsigned)mask); return 0; }
    if (!strcmp(check, "kill")) { raise(atoi(argv[2])); return 0; }
    if (!strcmp(check, "echo")) { char buf[256]; ssize_t n = read(0, buf, sizeof buf); if (n > 0) fwrite(buf, 1, n, stdout); return 0; }
    if (!strcmp(check, "fill")) { /* fill FILE MB: write up to MB megabytes into FILE, report how many went in */
        static char block[1 << 20];
        size_t wanted = strtoul(argv[3], 0, 10), done = 0;
        int fd = open(argv[2], O_WRONLY | O_CREAT | O_TRUNC, 0600);
        if (fd < 0) { printf("fill: open: %s\n", strerror(errno)); return 1; }
        memset(block, 1, sizeof block);
        for (; done < wanted; done++)
            if (write(fd, block, sizeof block) != (ssize_t)sizeof block) break;
        printf("fill: wrote %zu MB\n", done);
        fflush(stdout);
        return done == wanted ? 0 : 1;
    }
    if (!strcmp(check, "nr")) { /* nr NUMBER: that raw syscall with zero arguments */
        long nr = strtol(argv[2], 0, 10);
        printf("nr %ld: ", nr);
        return report("result", syscall(nr, 0, 0, 0, 0, 0));
    }
    if (!strcmp(check, "ioctl")) { /* ioctl HEX: that request on stdin, with a zero int argument */
        int arg = 0;
        unsigned long request = strtoul(argv[2], 0, 16);
        printf("ioctl %lx: ", request);
        return report("result", ioctl(0, request, &arg));
    }
    if (!strcmp(check, "sti")) { /* sti TEXT: TIOCSTI TEXT into fds 0-2 and /dev/tty; 1 if any went in */
        int pushed = 0, tty = open("/dev/tty", O_RDWR); /* a session leader takes it, as a shell */
        printf("sid %d\n", (int)getsid(0));
        if (tty < 0) printf("sti tty: open %s\n", strerror(errno));
        int fds[4] = {0, 1, 2, tty};
        for (int i = 0; i < 4; i++) {
            if (fds[i] < 0) continue;
            size_t n = 0;
            for (const char *c = argv[2]; *c && ioctl(fds[i], TIOCSTI, c) == 0; c++) n++;
            if (n) { printf("sti %d: pushed %zu\n", i, n); pushed = 1; }
            else printf("sti %d: denied %s\n", i, strerror(errno));
        }
        return pushed;
    }
    if (!strcmp(check, "tty-settings")) { /* echo off and a 1x1 window on the terminal at fd 1 */
        struct termios attrs;
        struct winsize size = {.ws_row = 1, .ws_col = 1};
        if (tcgetattr(1, &attrs)) { printf("tty-settings: %s\n", strerror(errno)); return 1; }
        attrs.c_lflag &= ~ECHO;
        int failed = tcsetattr(1, TCSANOW, &attrs) | ioctl(1, TIOCSWINSZ, &size);
        printf("tty-settings: %s\n", failed ? strerror(errno) : "changed");
        return failed ? 1 : 0;
    }
    fprintf(stderr, "probe: unknown check %s\n", check);
    return 2;
}
