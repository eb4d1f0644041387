/* Cove's guest init: PID 1 of a `vm` enclave.
 *
 * It loads the virtio modules the initramfs carries, finds the host's ports
 * (virtio-serial, by name), reads one launch request from cove.ctl, builds the
 * program's root from /image in a private mount and pid namespace (so the
 * program sees the same root and pid 2 as under `sim`), starts the program
 * with the requested ids, environment, working folder and limits, relays the
 * signals the host sends, and reports "X<code>" on cove.ctl before it powers
 * the VM off. The wire format is in docs/backends.md. Built with gcc -static.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <fnmatch.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <arpa/inet.h>
#include <net/if.h>
#include <net/route.h>
#include <netinet/in.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/reboot.h>
#include <sys/resource.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <dirent.h>
#include <grp.h>
#include <unistd.h>

#define MAX_REQUEST (1 << 20)
#define MAX_ITEMS 4096

static int ctl = -1;

/* Strict hex: "0"-"9", "a"-"f", "A"-"F" only (sscanf's %2x would take " f", "+f", "-1" or "0x"). */
static int nibble(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* Decode LEN bytes from 2*LEN hex digits into OUT (which may be HEX itself); 0 if any is not one. */
static int unhex(const char *hex, size_t len, char *out) {
    for (size_t j = 0; j < len; j++) {
        int high = nibble(hex[2 * j]), low = nibble(hex[2 * j + 1]);
        if (high < 0 || low < 0) return 0;
        out[j] = (char)(high << 4 | low);
    }
    return 1;
}

static void die(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    dprintf(2, "cove-init: %s\n", line);
    if (ctl >= 0) dprintf(ctl, "E%s\n", line);
    sync();
    reboot(RB_AUTOBOOT);
    _exit(1);
}

/* The network driver and what it needs: loaded only for network "host", after the request. */
static int network_module(const char *name) {
    return strcmp(name, "virtio_net.ko") == 0 || strcmp(name, "failover.ko") == 0 ||
           strcmp(name, "net_failover.ko") == 0;
}

/* The modules of /cove/modules.order, in order: those for the ports (network 0) or the network's (1). */
static void load_modules(int network) {
    FILE *order = fopen("/cove/modules.order", "r");
    char name[256], path[320];
    if (!order) return;
    while (fgets(name, sizeof name, order)) {
        name[strcspn(name, "\n")] = 0;
        if (!name[0] || network_module(name) != network) continue;
        snprintf(path, sizeof path, "/cove/modules/%s", name);
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) die("cannot open module %s", name);
        if (syscall(SYS_finit_module, fd, "", 0) != 0 && errno != EEXIST) die("cannot load %s: %s", name, strerror(errno));
        close(fd);
        unlink(path);  /* the kernel has its own copy: the file's pages go back to the program */
    }
    fclose(order);
}

/* Once the request's modules are in: the files nobody will load (the network's, unless network
 * "host") and the list go too. The initramfs is a tmpfs: each file kept would hold its pages from
 * the program (0.4 MB in all). */
static void forget_modules(void) {
    FILE *order = fopen("/cove/modules.order", "r");
    char name[256], path[320];
    if (!order) return;
    while (fgets(name, sizeof name, order)) {
        name[strcspn(name, "\n")] = 0;
        if (!name[0]) continue;
        snprintf(path, sizeof path, "/cove/modules/%s", name);
        unlink(path);
    }
    fclose(order);
    unlink("/cove/modules.order");
}

/* The /dev node of the virtio-serial port called NAME, waiting for it to appear. */
static int open_port(const char *name, int flags) {
    char path[300], text[64];
    for (int tries = 0; tries < 2000; tries++) {
        DIR *dir = opendir("/cove/sys/class/virtio-ports");
        struct dirent *entry;
        while (dir && (entry = readdir(dir))) {
            if (entry->d_name[0] == '.') continue;
            snprintf(path, sizeof path, "/cove/sys/class/virtio-ports/%s/name", entry->d_name);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0) continue;
            ssize_t n = read(fd, text, sizeof text - 1);
            close(fd);
            if (n <= 0) continue;
            text[n] = 0;
            text[strcspn(text, "\n")] = 0;
            if (strcmp(text, name) == 0) {
                snprintf(path, sizeof path, "/cove/dev/%s", entry->d_name);
                closedir(dir);
                for (int wait = 0; wait < 1000; wait++) {
                    int port = open(path, flags | O_CLOEXEC);
                    if (port >= 0) return port;
                    usleep(1000);
                }
                die("cannot open port %s", name);
            }
        }
        if (dir) closedir(dir);
        usleep(1000);
    }
    die("port %s did not appear", name);
    return -1;
}

/* Read exactly len bytes. Until the host's side of a port is announced open, reads
 * return 0: wait for that (up to 30 s) before the first byte, never after it. */
static void read_all(int fd, void *buf, size_t len, int first) {
    size_t done = 0;
    int waited = 0;
    while (done < len) {
        ssize_t n = read(fd, (char *)buf + done, len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n == 0 && first && done == 0 && waited++ < 30000) { usleep(1000); continue; }
        if (n <= 0) die("the host closed the control port");
        done += (size_t)n;
    }
}

/* The sealing keys (docs/formats/vm-guest.md, item K): the host derived them as sim's
 * /dev/attestation does; 32 hex digits each, mrenclave's then mrsigner's, at most one item. Decoded
 * here and the request's hex overwritten at once; written to keys/ by sealing_write, which wipes this copy. */
#define SEALING_KEY 16
static unsigned char sealing[2 * SEALING_KEY];
static int sealing_given;

static void sealing_parse(char *hex) {
    size_t n = strlen(hex);
    int ok = !sealing_given && n == 4 * SEALING_KEY && unhex(hex, sizeof sealing, (char *)sealing);
    memset(hex, '0', n);  /* wiped, its length kept: parse steps over it */
    if (!ok) die("malformed sealing keys item");
    sealing_given = 1;
}

/* keys/_sgx_mrenclave and keys/_sgx_mrsigner in DIR (the keys folder as on sim, 0555), 16 bytes each,
 * 0400 and owned by the program's uid and gid; then the init's copy is wiped. */
static void sealing_write(const char *dir, uid_t uid, gid_t gid) {
    if (!sealing_given) return;
    static const char *names[] = {"_sgx_mrenclave", "_sgx_mrsigner"};
    char path[128];
    snprintf(path, sizeof path, "%s/keys", dir);
    if (mkdir(path, 0755) != 0) die("mkdir %s: %s", path, strerror(errno));
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "%s/keys/%s", dir, names[i]);
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, 0400);
        if (fd < 0 || write(fd, sealing + i * SEALING_KEY, SEALING_KEY) != SEALING_KEY || fchown(fd, uid, gid) != 0 ||
            fchmod(fd, 0400) != 0) die("cannot write %s", path);
        close(fd);
    }
    explicit_bzero(sealing, sizeof sealing);
    sealing_given = 0;
    snprintf(path, sizeof path, "%s/keys", dir);
    if (chmod(path, 0555) != 0) die("chmod %s: %s", path, strerror(errno));
}

struct request {
    char *argv[MAX_ITEMS], *envp[MAX_ITEMS], *tmpfs[64], *files[64], *entries[64];
    int argc, envc, ntmpfs, nfiles, nentries, debug;
    char *shared[16];  /* "rw|ro:TAG:TARGET": encrypted and host mounts the host serves over virtio-fs */
    int nshared;
    const char *cwd, *hostname, *network, *attestation;
    const char *root;  /* a virtio-fs tag: the image root the host serves (--encrypt-image), or NULL */
    uid_t uid;
    gid_t gid;
    long nproc, nofile;
    int probe;
    int tty;                   /* M item: the program's own terminal (--debug-enclave at the user's) */
    unsigned short rows, cols; /* its first size */
    int umask_set;             /* B item: the caller's umask, for the program and its execs (else the init's 022) */
    mode_t umask;
};

/* "B" item: 1 to 4 octal digits, at most 0777. */
static int octal_mask(const char *text, mode_t *mask) {
    unsigned value = 0;
    int digits = 0;
    for (; *text >= '0' && *text <= '7'; text++, digits++) value = value * 8 + (unsigned)(*text - '0');
    if (digits < 1 || digits > 4 || *text || value > 0777) return 0;
    *mask = (mode_t)value;
    return 1;
}

/* "ROWS:COLS", each 1 to 5 ASCII digits and at most 65535: a terminal's size from the host. */
static int window_size(const char *text, unsigned short *rows, unsigned short *cols) {
    unsigned long value[2] = {0, 0};
    for (int i = 0; i < 2; i++) {
        int digits = 0;
        for (; *text >= '0' && *text <= '9'; text++, digits++) value[i] = value[i] * 10 + (unsigned long)(*text - '0');
        if (digits < 1 || digits > 5 || value[i] > 65535 || *text != (i == 0 ? ':' : 0)) return 0;
        text++;
    }
    *rows = (unsigned short)value[0];
    *cols = (unsigned short)value[1];
    return 1;
}

static void parse(char *body, size_t len, struct request *r) {
    memset(r, 0, sizeof *r);
    r->cwd = "/";
    r->hostname = "enclave";
    r->network = "none";
    r->attestation = "none";
    r->nproc = r->nofile = -1;
    if (len == 0 || body[len - 1] != 0) die("malformed request");
    for (char *item = body; item < body + len; item += strlen(item) + 1) {
        char kind = item[0], *value = item + (kind ? 1 : 0);
        switch (kind) {
        case 'A': if (r->argc < MAX_ITEMS - 1) r->argv[r->argc++] = value; else die("too many arguments"); break;
        case 'E': if (r->envc < MAX_ITEMS - 1) r->envp[r->envc++] = value; else die("too many variables"); break;
        case 'T': if (r->ntmpfs < 63) r->tmpfs[r->ntmpfs++] = value; else die("too many mounts"); break;
        case 'U': r->uid = (uid_t)strtoul(value, NULL, 10); break;
        case 'G': r->gid = (gid_t)strtoul(value, NULL, 10); break;
        case 'C': r->cwd = value; break;
        case 'H': r->hostname = value; break;
        case 'N': r->network = value; break;
        case 'P': r->nproc = strtol(value, NULL, 10); break;
        case 'F': r->nofile = strtol(value, NULL, 10); break;
        case 'Q': r->probe = 1; break;
        case 'Y': r->attestation = value; break;
        case 'I': if (r->nentries < 63) r->entries[r->nentries++] = value; else die("too many entry points"); break;
        case 'D': r->debug = 1; break;
        case 'W': if (r->nfiles < 63) r->files[r->nfiles++] = value; else die("too many files"); break;
        case 'V': if (r->nshared < 16) r->shared[r->nshared++] = value; else die("too many encrypted mounts"); break;
        case 'K': sealing_parse(value); break;
        case 'O': if (!value[0] || r->root) die("malformed root item"); r->root = value; break;
        case 'M': if (r->tty || !window_size(value, &r->rows, &r->cols)) die("malformed terminal item"); r->tty = 1; break;
        case 'B': if (r->umask_set || !octal_mask(value, &r->umask)) die("malformed umask item"); r->umask_set = 1; break;
        default: die("unknown request item %c", kind ? kind : '0');
        }
    }
    if (!r->probe && r->argc == 0) die("no program in the request");
}

static void interface_up(int s, const char *name) {
    struct ifreq ifr = {0};
    strcpy(ifr.ifr_name, name);
    if (ioctl(s, SIOCGIFFLAGS, &ifr) < 0) die("no interface %s", name);
    ifr.ifr_flags |= IFF_UP | IFF_RUNNING;
    if (ioctl(s, SIOCSIFFLAGS, &ifr) < 0) die("cannot bring up %s", name);
}

static void set_address(int s, const char *name, unsigned long request, const char *address) {
    struct ifreq ifr = {0};
    struct sockaddr_in *sin = (struct sockaddr_in *)&ifr.ifr_addr;
    strcpy(ifr.ifr_name, name);
    sin->sin_family = AF_INET;
    inet_pton(AF_INET, address, &sin->sin_addr);
    if (ioctl(s, request, &ifr) < 0) die("cannot set %s on %s: %s", address, name, strerror(errno));
}

/* network "loopback": lo up. "host": also eth0 on QEMU's user-mode network, 10.0.2.15/24 via 10.0.2.2. */
static void network_up(const char *mode) {
    int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (s < 0) die("socket: %s", strerror(errno));
    interface_up(s, "lo");
    if (strcmp(mode, "host") == 0) {
        for (int tries = 0; !if_nametoindex("eth0"); tries++) {
            if (tries > 3000) die("the network device did not appear");
            usleep(1000);
        }
        set_address(s, "eth0", SIOCSIFADDR, "10.0.2.15");
        set_address(s, "eth0", SIOCSIFNETMASK, "255.255.255.0");
        interface_up(s, "eth0");
        struct rtentry route = {0};
        struct sockaddr_in *gateway = (struct sockaddr_in *)&route.rt_gateway;
        ((struct sockaddr_in *)&route.rt_dst)->sin_family = AF_INET;
        ((struct sockaddr_in *)&route.rt_genmask)->sin_family = AF_INET;
        gateway->sin_family = AF_INET;
        inet_pton(AF_INET, "10.0.2.2", &gateway->sin_addr);
        route.rt_flags = RTF_UP | RTF_GATEWAY;
        if (ioctl(s, SIOCADDRT, &route) < 0) die("default route: %s", strerror(errno));
    }
    close(s);
}

static void node(const char *path, mode_t mode, int major, int minor) {
    if (mknod(path, S_IFCHR | mode, makedev(major, minor)) != 0) die("mknod %s: %s", path, strerror(errno));
    chmod(path, mode);
}

static void write_file(const char *path, const void *data, size_t len, mode_t mode) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
    if (fd < 0 || write(fd, data, len) != (ssize_t)len || fchmod(fd, mode) != 0) die("cannot write %s", path);
    close(fd);
}

/* The encrypted and host mounts: each a virtio-fs device whose host side (virtiofsd) exports the
 * plaintext view of the host's secure file system server, or a host folder (docs/backends.md);
 * read-only when cove.toml says so (and the host's side is read-only then too). */
static void mount_shared(struct request *r) {
    char path[512];
    for (int i = 0; i < r->nshared; i++) {  /* "rw|ro:TAG:TARGET" */
        char *mode = r->shared[i], *tag = strchr(mode, ':'), *target;
        if (!tag || !(target = strchr(tag + 1, ':')) || tag - mode != 2) die("malformed encrypted mount %s", mode);
        *tag++ = 0;
        *target++ = 0;
        unsigned long flags = MS_NOSUID | MS_NODEV;
        if (strcmp(mode, "ro") == 0) flags |= MS_RDONLY;
        else if (strcmp(mode, "rw") != 0) die("malformed encrypted mount %s", target);
        snprintf(path, sizeof path, "/image%s", target);
        if (mount(tag, path, "virtiofs", flags, NULL) != 0) die("mount %s (virtio-fs %s): %s", target, tag, strerror(errno));
    }
}

/* [vm] tpm_device: the VM's vTPM, which the kernel found as tpm0 (and its resource-managed tpmrm0),
 * in the program's /dev, 0600 and owned by the program's ids as /dev/attestation/keys/ are: the TPM is
 * the enclave's own. Nothing without the device (a build without it has none in /cove/dev). */
static void tpm_nodes(struct request *r) {
    static const char *const names[] = {"tpm0", "tpmrm0"};
    char from[64], to[64];
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        struct stat st;
        snprintf(from, sizeof from, "/cove/dev/%s", names[i]);
        if (stat(from, &st) != 0 || !S_ISCHR(st.st_mode)) continue;
        snprintf(to, sizeof to, "/image/dev/%s", names[i]);
        if (mknod(to, S_IFCHR | 0600, st.st_rdev) != 0 || chown(to, r->uid, r->gid) != 0 || chmod(to, 0600) != 0)
            die("%s: %s", to, strerror(errno));
    }
}

/* The program's own devpts (a new instance), for `cove exec -t`'s terminals, with /dev/ptmx as on sim. */
static void mount_devpts(void) {
    mkdir("/image/dev/pts", 0755);
    if (mount("devpts", "/image/dev/pts", "devpts", MS_NOSUID | MS_NOEXEC, "newinstance,ptmxmode=0666,mode=0620") != 0)
        die("mount /dev/pts: %s", strerror(errno));
    symlink("pts/ptmx", "/image/dev/ptmx");
}

/* The program's root: /image, read-only, with /proc, a minimal /dev, /dev/attestation and the
 * requested tmpfs mounts, all mounted below /image before it becomes the root. */
static void enter_root(struct request *r) {
    char path[512];
    if (mount(NULL, "/", NULL, MS_REC | MS_PRIVATE, NULL) != 0) die("private mounts: %s", strerror(errno));
    /* an encrypted image: the host's verifying view over virtio-fs replaces the initramfs's empty /image */
    if (r->root && mount(r->root, "/image", "virtiofs", MS_RDONLY | MS_NOSUID | MS_NODEV, NULL) != 0)
        die("mount the root (virtio-fs %s): %s", r->root, strerror(errno));
    if (mount("/image", "/image", NULL, MS_BIND | MS_REC, NULL) != 0) die("bind image: %s", strerror(errno));
    if (mount("proc", "/image/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("mount /proc: %s", strerror(errno));
    if (mount("dev", "/image/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "mode=0755,size=64k") != 0) die("mount /dev: %s", strerror(errno));
    node("/image/dev/null", 0666, 1, 3);
    node("/image/dev/zero", 0666, 1, 5);
    node("/image/dev/full", 0666, 1, 7);
    node("/image/dev/random", 0666, 1, 8);
    node("/image/dev/urandom", 0666, 1, 9);
    node("/image/dev/tty", 0666, 5, 0);
    tpm_nodes(r);
    mkdir("/image/dev/shm", 01777);
    chmod("/image/dev/shm", 01777);
    mount_devpts();
    symlink("/proc/self/fd", "/image/dev/fd");
    symlink("/proc/self/fd/0", "/image/dev/stdin");
    symlink("/proc/self/fd/1", "/image/dev/stdout");
    symlink("/proc/self/fd/2", "/image/dev/stderr");
    mkdir("/image/dev/attestation", 0755);
    if (mount("/cove/attestation", "/image/dev/attestation", NULL, MS_BIND, NULL) != 0) die("bind /dev/attestation: %s", strerror(errno));
    for (int i = 0; i < r->ntmpfs; i++) {  /* "SIZE:MODE:TARGET" */
        char *size = r->tmpfs[i], *mode = strchr(size, ':'), *target, options[64];
        if (!mode || !(target = strchr(mode + 1, ':'))) die("malformed mount %s", size);
        *mode++ = 0;
        *target++ = 0;
        snprintf(options, sizeof options, "mode=%s%s%s", mode, size[0] ? ",size=" : "", size);
        snprintf(path, sizeof path, "/image%s", target);
        if (mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, options) != 0) die("mount %s: %s", target, strerror(errno));
    }
    mount_shared(r);
    for (int i = 0; i < r->nfiles; i++) {  /* "HEX:TARGET": a provisioned secret, read-only like on sim */
        char *hex = r->files[i], *target = strchr(hex, ':');
        if (!target || (target - hex) % 2) die("malformed file item");
        *target++ = 0;
        size_t len = strlen(hex) / 2;
        if (!unhex(hex, len, hex)) die("malformed file item");
        snprintf(path, sizeof path, "/image%s", target);
        write_file(path, hex, len, 0444);
        if (mount(path, path, NULL, MS_BIND, NULL) != 0 ||
            mount(NULL, path, NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) != 0) die("read-only %s: %s", target, strerror(errno));
    }
    if (chdir("/image") != 0) die("chdir image");
    if (mount(".", "/", NULL, MS_MOVE, NULL) != 0) die("move root: %s", strerror(errno));
    if (chroot(".") != 0 || chdir("/") != 0) die("chroot: %s", strerror(errno));
    if (mount(NULL, "/", NULL, MS_REMOUNT | MS_BIND | MS_RDONLY, NULL) != 0) die("read-only root: %s", strerror(errno));
}

static void write_all(int fd, const void *buf, size_t len) {
    size_t done = 0;
    while (done < len) {
        ssize_t n = write(fd, (const char *)buf + done, len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) return;
        done += (size_t)n;
    }
}

/* /dev/attestation as on sim: user_report_data is a 64-byte file the program writes; quote and
 * report are FIFOs. Each open of one for reading is answered by a helper (outside the program's
 * pid namespace) that sends its kind ('Q' or 'R') and the current report data to the host on the
 * shared cove.attest port and writes back the evidence the host's platform key made for exactly
 * this enclave (docs/backends.md). The two helpers take turns on the port under a file lock. */
static void serve_fifo(const char *fifo, int port, char kind) {
    static unsigned char evidence[1 << 20];
    signal(SIGPIPE, SIG_IGN);
    int lock = open("/cove/attest.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0600);  /* this helper's own */
    if (lock < 0) _exit(1);
    for (;;) {
        int out = open(fifo, O_WRONLY | O_CLOEXEC);
        if (out < 0) { if (errno == EINTR) continue; _exit(1); }
        unsigned char data[65] = {0};
        data[0] = (unsigned char)kind;
        int in = open("/cove/attestation/user_report_data", O_RDONLY | O_CLOEXEC);
        if (in >= 0) { if (read(in, data + 1, 64) < 0) memset(data + 1, 0, 64); close(in); }
        while (flock(lock, LOCK_EX) != 0) if (errno != EINTR) _exit(1);
        write_all(port, data, sizeof data);
        uint32_t len;
        read_all(port, &len, sizeof len, 0);
        if (len > sizeof evidence) _exit(1);
        read_all(port, evidence, len, 0);
        flock(lock, LOCK_UN);
        write_all(out, evidence, len);
        close(out);
        /* Until this reader closes, a new open for writing would succeed at once and hand it a
         * second copy: wait until no reader is left (ENXIO) before serving the next one. */
        for (;;) {
            int probe = open(fifo, O_WRONLY | O_NONBLOCK | O_CLOEXEC);
            if (probe < 0) break;
            close(probe);
            usleep(1000);
        }
    }
}

static struct request *launched;  /* defined below, with the signal relay */

static void attestation_setup(const char *type) {
    mkdir("/cove/attestation", 0755);
    if (mount("attestation", "/cove/attestation", "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=0755,size=64k") != 0)
        die("mount attestation: %s", strerror(errno));
    write_file("/cove/attestation/attestation_type", type, strlen(type), 0444);
    sealing_write("/cove/attestation", launched->uid, launched->gid);  /* as on sim, whatever the type */
    if (strcmp(type, "cove") != 0) return;
    static const unsigned char zeros[64];
    write_file("/cove/attestation/user_report_data", zeros, sizeof zeros, 0666);
    const char *names[] = {"quote", "report"}, kinds[] = {'Q', 'R'};
    int port = open_port("cove.attest", O_RDWR);
    for (int i = 0; i < 2; i++) {
        char fifo[64];
        snprintf(fifo, sizeof fifo, "/cove/attestation/%s", names[i]);
        if (mkfifo(fifo, 0444) != 0 || chmod(fifo, 0444) != 0) die("mkfifo %s", fifo);
        pid_t helper = fork();
        if (helper < 0) die("fork: %s", strerror(errno));
        if (helper == 0) serve_fifo(fifo, port, kinds[i]);
    }
    close(port);
}

static void drop_capabilities(void) {
    for (int cap = 0; cap <= 63; cap++) prctl(PR_CAPBSET_DROP, cap, 0, 0, 0);
    struct __user_cap_header_struct header = {_LINUX_CAPABILITY_VERSION_3, 0};
    struct __user_cap_data_struct data[2] = {{0}};
    if (syscall(SYS_capset, &header, data) != 0) die("capset: %s", strerror(errno));
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) die("no_new_privs");
}

static volatile sig_atomic_t program = 0;
static struct request *launched;

static void relay(int signum) {
    if (program > 0) kill(-program, signum);
}

/* --debug-enclave at the user's terminal (the M item): the program's controlling terminal is a
 * pseudo-terminal of its own devpts, as sim gives one; the host's terminal is raw, and PID 1 of the
 * program's namespace copies bytes between the terminal and the stdin and stdout ports, and applies
 * the sizes the host sends ("T<rows>:<cols>" on cove.ctl, passed on by the outer init over this pipe). */
static int resize_pipe[2] = {-1, -1};

static int open_terminal(struct request *r, int *slave) {
    int unlock = 0;
    struct winsize size = {.ws_row = r->rows, .ws_col = r->cols};
    int master = open("/dev/pts/ptmx", O_RDWR | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW);
    if (master < 0 || ioctl(master, TIOCSPTLCK, &unlock) != 0 || ioctl(master, TIOCSWINSZ, &size) != 0 ||
        (*slave = ioctl(master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0)
        die("cannot open the program's terminal: %s", strerror(errno));
    if (fchown(*slave, r->uid, r->gid) != 0) { /* the terminal still works; only its owner differs */ }
    return master;
}

static void child_ended(int signum) { (void)signum; }  /* no SA_RESTART: poll() returns */

static int relay_terminal(int master, int in, int out, pid_t pid) {
    struct sigaction sa = {0};
    sa.sa_handler = child_ended;
    sigaction(SIGCHLD, &sa, NULL);
    static char buf[4096];
    int code = -1, status, from = master;
    while (code < 0) {
        struct pollfd fds[3] = {{from, POLLIN, 0}, {in, POLLIN, 0}, {resize_pipe[0], POLLIN, 0}};
        int ready = poll(fds, 3, 100);
        for (pid_t done; (done = waitpid(-1, &status, WNOHANG)) > 0;)
            if (done == pid) code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
        if (ready <= 0) continue;
        if (fds[0].revents) {  /* a hang-up without data: nobody holds the terminal; wait for the end */
            ssize_t n = read(master, buf, sizeof buf);
            if (n > 0) write_all(out, buf, (size_t)n);
            else if (n < 0 && errno != EINTR && errno != EAGAIN) from = -1;
        }
        if (fds[1].revents) {  /* the end of the host's input: a terminal has none, it is ignored */
            ssize_t n = read(in, buf, sizeof buf);
            if (n > 0) write_all(master, buf, (size_t)n);
            else if (n == 0 || (errno != EINTR && errno != EAGAIN)) in = -1;
        }
        unsigned short size[2];
        if (fds[2].revents && read(resize_pipe[0], size, sizeof size) == (ssize_t)sizeof size) {
            struct winsize ws = {.ws_row = size[0], .ws_col = size[1]};
            ioctl(master, TIOCSWINSZ, &ws);  /* the foreground group gets SIGWINCH */
        }
    }
    for (struct pollfd p = {master, POLLIN, 0}; poll(&p, 1, 0) > 0 && (p.revents & POLLIN);) {
        ssize_t n = read(master, buf, sizeof buf);  /* what the program wrote last */
        if (n <= 0) break;
        write_all(out, buf, (size_t)n);
    }
    return code;
}

/* PID 1 of the program's pid namespace: start the program as pid 2, reap, return its code. */
static int namespace_init(struct request *r, int in, int out, int err) {
    enter_root(r);
    sethostname(r->hostname, strlen(r->hostname));
    int forwarded[] = {SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};
    struct sigaction sa = {0};
    sa.sa_handler = relay;
    for (unsigned i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++) sigaction(forwarded[i], &sa, NULL);
    int slave = -1, master = r->tty ? open_terminal(r, &slave) : -1;
    pid_t pid = fork();
    if (pid < 0) die("fork: %s", strerror(errno));
    if (pid == 0) {
        setsid();
        if (master >= 0) {  /* the terminal becomes the new session's controlling terminal */
            if (ioctl(slave, TIOCSCTTY, 0) != 0 || dup2(slave, 0) < 0 || dup2(slave, 1) < 0 || dup2(slave, 2) < 0)
                die("the program's terminal: %s", strerror(errno));
        } else if (dup2(in, 0) < 0 || dup2(out, 1) < 0 || dup2(err, 2) < 0) die("dup2");
        struct rlimit limit;
        if (r->nproc > 0) { limit.rlim_cur = limit.rlim_max = (rlim_t)r->nproc; setrlimit(RLIMIT_NPROC, &limit); }
        if (r->nofile > 0) { limit.rlim_cur = limit.rlim_max = (rlim_t)r->nofile; setrlimit(RLIMIT_NOFILE, &limit); }
        if (setgroups(0, NULL) != 0 || setgid(r->gid) != 0 || setuid(r->uid) != 0) die("cannot set ids");
        if (chdir(r->cwd) != 0) die("cannot enter %s: %s", r->cwd, strerror(errno));
        drop_capabilities();
        if (r->umask_set) umask(r->umask);
        for (int sig = 1; sig < 32; sig++) signal(sig, SIG_DFL);
        dprintf(ctl, "R\n");
        r->argv[r->argc] = NULL;
        r->envp[r->envc] = NULL;
        execve(r->argv[0], r->argv, r->envp);
        dprintf(2, "cove-init: cannot run %s: %s\n", r->argv[0], strerror(errno));
        _exit(127);
    }
    program = pid;
    if (master >= 0) {
        close(slave);
        return relay_terminal(master, in, out, pid);
    }
    int status = 0, code = -1;
    for (;;) {
        pid_t done = waitpid(-1, &status, 0);
        if (done < 0 && errno == EINTR) continue;
        if (done < 0) break;
        if (done == pid) {  /* as on sim: the enclave ends with its program; leaving kills the rest */
            code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            break;
        }
    }
    return code;
}

/* `cove exec`: the host sends "x<id>:<hex of NUL-terminated arguments>"; the program starts in the
 * program's namespaces and root with the enclave's ids, environment, folder and limits, if it is an
 * entry point (as on sim: a path, or a folder prefix ending in /; any program in a debug enclave).
 * Its output goes back as "o<id>:<hex>" and "e<id>:<hex>" lines, then "x<id>:<code>"; a refusal is
 * "r<id>:<reason>". "k<id>" from the host kills it. */
#define MAX_EXECS 16
#define MAX_LINE (160 << 10)
#define EXEC_OUT_WINDOW (256 << 10) /* bytes of o/e lines the host has not acknowledged: then the output waits */
#define EXEC_IN_WINDOW (64 << 10)   /* bytes of input the host may send ahead of what the program read */
#define EXEC_DRAIN_MAX (128 << 10)  /* bytes of each output relayed once the program has ended */
struct exec {
    unsigned long id;
    pid_t waiter;
    int out, err, in, tty;  /* in: the program's stdin pipe or the terminal's master (-1: none) */
    size_t unacked, inlen;  /* output bytes sent and not acknowledged; input bytes not yet written */
    int in_ended;           /* the host sent the end of the input */
    char *inbuf;            /* EXEC_IN_WINDOW bytes with -i or -t */
};
static struct exec execs[MAX_EXECS];

static int entry_point(struct request *r, const char *path) {
    if (r->debug) return 1;
    if (path[0] != '/' || strstr(path, "/./") || strstr(path, "/../") || strstr(path, "//")) return 0;
    size_t n = strlen(path);
    if ((n >= 2 && strcmp(path + n - 2, "/.") == 0) || (n >= 3 && strcmp(path + n - 3, "/..") == 0) || path[n - 1] == '/') return 0;
    for (int i = 0; i < r->nentries; i++) {
        size_t m = strlen(r->entries[i]);
        if (m && r->entries[i][m - 1] == '/' ? strncmp(path, r->entries[i], m) == 0 : strcmp(path, r->entries[i]) == 0) return 1;
    }
    return 0;
}

/* One "<kind><id>:<hex>" line to the host; its length, which the host acknowledges ("a<id>:<n>"). */
static size_t send_hex(char kind, unsigned long id, const unsigned char *data, size_t len) {
    static char line[2 * 4096 + 64];
    static const char digits[] = "0123456789abcdef";
    int at = snprintf(line, sizeof line, "%c%lu:", kind, id);
    for (size_t i = 0; i < len; i++) {  /* not snprintf per byte: emulated (TCG), that was the cost of a line */
        line[at++] = digits[data[i] >> 4];
        line[at++] = digits[data[i] & 15];
    }
    line[at++] = '\n';
    write_all(ctl, line, (size_t)at);
    return (size_t)at;
}

static volatile sig_atomic_t killed = 0;

static void kill_program(int signum) {
    (void)signum;
    killed = 1;
    if (program > 0) kill(program, SIGKILL);  /* its waitpid returns; kill_session then takes the rest */
}

/* SIGKILL every live process of session SID, as /proc (opened as PROC, the guest's pid namespace)
 * shows them, until none is left: setpgid() does not take a process out of its session. */
static void kill_session(int proc, pid_t sid) {
    for (int found = 1; found;) {
        found = 0;
        int fd = dup(proc);
        DIR *dir = fd < 0 ? NULL : fdopendir(fd);
        if (!dir) { if (fd >= 0) close(fd); return; }
        rewinddir(dir);
        struct dirent *entry;
        while ((entry = readdir(dir))) {
            char path[300], stat[512];
            if (entry->d_name[0] < '1' || entry->d_name[0] > '9') continue;
            snprintf(path, sizeof path, "%s/stat", entry->d_name);
            int file = openat(proc, path, O_RDONLY | O_CLOEXEC);
            if (file < 0) continue;
            ssize_t n = read(file, stat, sizeof stat - 1);
            close(file);
            if (n <= 0) continue;
            stat[n] = 0;
            char *after = strrchr(stat, ')');  /* the name may hold spaces and parentheses */
            char state;
            int ppid, pgrp, session;
            if (!after || sscanf(after + 1, " %c %d %d %d", &state, &ppid, &pgrp, &session) != 4) continue;
            if (session != sid || state == 'Z' || state == 'X') continue;
            kill(atoi(entry->d_name), SIGKILL);
            found = 1;
        }
        closedir(dir);
        if (found) usleep(1000);
    }
}

/* `cove exec -i` and `-t` (docs/backends.md). "x<id>.i.<rows>.<cols>:<hex>" gives the program a pipe
 * as stdin, "x<id>.t.<rows>.<cols>:<hex>" a terminal of the program's own devpts, sized rows x cols,
 * as its controlling terminal and stdin, stdout and stderr. The host then sends "i<id>:<hex>" input
 * (empty: the end of it, which a terminal ignores), "w<id>:<rows>:<cols>" window sizes and
 * "a<id>:<n>" for each n bytes of o/e lines it passed on; the init answers "i<id>:<n>" for input
 * written to the program (or dropped). Both windows keep every buffer bounded: the host sends at
 * most EXEC_IN_WINDOW bytes of input ahead, and the init stops reading a program's output while
 * EXEC_OUT_WINDOW bytes of its lines are unacknowledged, so a program whose client does not read
 * blocks in write(), as on sim. */
struct exec_mode { char kind; unsigned short rows, cols; };

/* START..COLON of an "x" line after "x": the id, then nothing or ".i|t.<rows>.<cols>"; 0 if malformed. */
static int exec_parse_mode(const char *start, const char *colon, struct exec_mode *mode) {
    char *at;
    unsigned long rows, cols;
    memset(mode, 0, sizeof *mode);
    strtoul(start, &at, 10);
    if (at == colon) return 1;
    if (at + 3 > colon || at[0] != '.' || (at[1] != 'i' && at[1] != 't') || at[2] != '.') return 0;
    mode->kind = at[1];
    rows = strtoul(at + 3, &at, 10);
    if (*at != '.') return 0;
    cols = strtoul(at + 1, &at, 10);
    if (at != colon || rows > 0xffff || cols > 0xffff) return 0;
    mode->rows = (unsigned short)rows;
    mode->cols = (unsigned short)cols;
    return 1;
}

static void exec_close_ends(int a, int b, int c, int d) {
    int fds[] = {a, b, c, d};
    for (int i = 0; i < 4; i++) if (fds[i] >= 0) close(fds[i]);
}

/* In a waiter: the other sessions' descriptors are PID 1's, not its own (an input would never end). */
static void exec_close_others(void) {
    for (int i = 0; i < MAX_EXECS; i++) if (execs[i].waiter) exec_close_ends(execs[i].out, execs[i].err, execs[i].in, -1);
}

static int exec_pipes(int out[2], int err[2], int in[2], int input) {
    if (pipe2(out, O_CLOEXEC) != 0) return -1;
    if (pipe2(err, O_CLOEXEC) != 0) { exec_close_ends(out[0], out[1], -1, -1); return -1; }
    if (input && pipe2(in, O_CLOEXEC) != 0) { exec_close_ends(out[0], out[1], err[0], err[1]); return -1; }
    return 0;
}

/* A new pseudo-terminal in the devpts of the program's mount namespace (reached through its
 * namespace init's root), sized, its peer owned by the enclave's user; 0, or -1 with errno. */
static int exec_terminal(struct request *r, pid_t ns_init, const struct exec_mode *mode, int *master, int *slave) {
    char path[96];
    int unlock = 0;
    struct winsize size = {.ws_row = mode->rows, .ws_col = mode->cols};
    snprintf(path, sizeof path, "/cove/proc/%d/root/dev/pts/ptmx", (int)ns_init);
    *master = open(path, O_RDWR | O_NOCTTY | O_CLOEXEC | O_NOFOLLOW);
    if (*master < 0) return -1;
    if (ioctl(*master, TIOCSPTLCK, &unlock) != 0 || ioctl(*master, TIOCSWINSZ, &size) != 0 ||
        (*slave = ioctl(*master, TIOCGPTPEER, O_RDWR | O_NOCTTY | O_CLOEXEC)) < 0) {
        int saved = errno;
        close(*master);
        errno = saved;
        return -1;
    }
    if (fchown(*slave, r->uid, r->gid) != 0) { /* the terminal still works; only its owner differs */ }
    return 0;
}

/* Write what input is held to the program; acknowledge what was written, or dropped once the
 * program closed its end. The end of the input closes a pipe once all was written. */
static void exec_feed(struct exec *e) {
    while (e->in >= 0 && e->inlen) {
        ssize_t n = write(e->in, e->inbuf, e->inlen);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0 && errno == EAGAIN) return;
        size_t done = n > 0 ? (size_t)n : e->inlen;
        if (n <= 0) { close(e->in); e->in = -1; }
        memmove(e->inbuf, e->inbuf + done, e->inlen - done);
        e->inlen -= done;
        dprintf(ctl, "i%lu:%zu\n", e->id, done);
    }
    if (e->in >= 0 && e->in_ended && !e->tty && !e->inlen) { close(e->in); e->in = -1; }
}

static void exec_input(struct exec *e, const char *hex) {
    size_t len = strlen(hex) / 2;
    if (len == 0) { e->in_ended = 1; exec_feed(e); return; }
    /* no input to write to, or the host sent more than the window or bad hex: acknowledged, dropped */
    if (strlen(hex) % 2 || e->in < 0 || !e->inbuf || len > EXEC_IN_WINDOW - e->inlen ||
        !unhex(hex, len, e->inbuf + e->inlen)) {
        dprintf(ctl, "i%lu:%zu\n", e->id, len);
        return;
    }
    e->inlen += len;
    exec_feed(e);
}

static void exec_stream_line(char kind, unsigned long id, const char *value) {
    struct exec *e = NULL;
    for (int i = 0; i < MAX_EXECS; i++) if (execs[i].waiter && execs[i].id == id) e = &execs[i];
    if (!e) return;  /* it ended: the line crossed its "x" */
    if (kind == 'i') exec_input(e, value);
    else if (kind == 'a') {
        unsigned long n = strtoul(value, NULL, 10);
        e->unacked -= n < e->unacked ? n : e->unacked;
    } else if (kind == 'w' && e->tty) {  /* the program's foreground group gets SIGWINCH */
        char *at;
        unsigned long rows = strtoul(value, &at, 10), cols = *at == ':' ? strtoul(at + 1, NULL, 10) : 0;
        struct winsize size = {.ws_row = (unsigned short)rows, .ws_col = (unsigned short)cols};
        int fd = e->in >= 0 ? e->in : e->out;
        if (*at == ':' && rows <= 0xffff && cols <= 0xffff && fd >= 0) ioctl(fd, TIOCSWINSZ, &size);
    }
}

static void exec_start(struct request *r, pid_t ns_init, unsigned long id, const struct exec_mode *mode, char *hex) {
    static char args[MAX_LINE / 2 + 1];
    char *argv[256];
    int argc = 0, slot = -1;
    size_t len = strlen(hex) / 2;
    if (strlen(hex) % 2) { dprintf(ctl, "r%lu:malformed request\n", id); return; }
    if (!unhex(hex, len, args)) { dprintf(ctl, "r%lu:malformed request\n", id); return; }
    if (len == 0 || args[len - 1] != 0) { dprintf(ctl, "r%lu:malformed request\n", id); return; }
    for (char *a = args; a < args + len; a += strlen(a) + 1) {
        if (argc == 255) { dprintf(ctl, "r%lu:too many arguments\n", id); return; }
        argv[argc++] = a;
    }
    argv[argc] = NULL;
    if (!entry_point(r, argv[0])) {  /* the host's bytes: no newline may forge a line of another kind */
        char shown[201];
        size_t n = 0;
        for (const char *c = argv[0]; *c && n < sizeof shown - 1; c++) shown[n++] = *c >= 0x20 && *c < 0x7f ? *c : '?';
        shown[n] = 0;
        dprintf(ctl, "r%lu:%s is not an entry point of this enclave\n", id, shown);
        return;
    }
    for (int i = 0; i < MAX_EXECS; i++) if (!execs[i].waiter) { slot = i; break; }
    if (slot < 0) { dprintf(ctl, "r%lu:too many programs started by cove exec at once\n", id); return; }
    int out[2], err[2], in[2] = {-1, -1}, master = -1, slave = -1;
    char *inbuf = NULL;
    if (mode->kind && !(inbuf = malloc(EXEC_IN_WINDOW))) { dprintf(ctl, "r%lu:out of memory\n", id); return; }
    if (mode->kind == 't' && exec_terminal(r, ns_init, mode, &master, &slave) != 0) {
        dprintf(ctl, "r%lu:cannot open a terminal in the enclave: %s\n", id, strerror(errno));
        free(inbuf);
        return;
    }
    if (mode->kind == 't') {  /* the terminal is the program's stdin, stdout and stderr: no pipes */
        out[0] = master, out[1] = -1, err[0] = err[1] = -1;
        in[1] = fcntl(master, F_DUPFD_CLOEXEC, 0);  /* never the program's: it has only the peer */
    } else if (exec_pipes(out, err, in, mode->kind == 'i') != 0) {
        dprintf(ctl, "r%lu:pipe: %s\n", id, strerror(errno));
        free(inbuf);
        return;
    }
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    sigprocmask(SIG_BLOCK, &term, NULL);  /* a "k<id>" before the waiter's handler is in place waits for it */
    pid_t waiter = fork();
    if (waiter == 0) {  /* outside the namespaces: enter them, start the program in them, wait for it */
        exec_close_others();
        struct sigaction sa = {0};
        sa.sa_handler = kill_program;
        sigaction(SIGTERM, &sa, NULL);  /* "k<id>": the program's session goes */
        sigset_t all;
        sigemptyset(&all);
        sigaddset(&all, SIGCHLD);
        sigprocmask(SIG_UNBLOCK, &all, NULL);
        int proc = open("/cove/proc", O_RDONLY | O_DIRECTORY | O_CLOEXEC);  /* the guest's: the pids fork() gives */
        int pidfd = (int)syscall(SYS_pidfd_open, ns_init, 0);
        char where[64];
        snprintf(where, sizeof where, "/cove/proc/%d/root", (int)ns_init);
        int root = open(where, O_PATH | O_DIRECTORY | O_CLOEXEC);
        if (proc < 0 || root < 0 || pidfd < 0 || setns(pidfd, CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC) != 0) _exit(125);
        if (fchdir(root) != 0 || chroot(".") != 0) _exit(125);
        pid_t pid = fork();
        if (pid < 0) _exit(125);
        if (pid == 0) {
            setsid();
            if (slave >= 0) {  /* the terminal becomes this new session's controlling terminal */
                if (ioctl(slave, TIOCSCTTY, 0) != 0 || dup2(slave, 0) < 0 || dup2(slave, 1) < 0 || dup2(slave, 2) < 0) _exit(125);
            } else {
                int input = in[0] >= 0 ? in[0] : open("/dev/null", O_RDONLY);
                if (input < 0 || dup2(input, 0) < 0 || dup2(out[1], 1) < 0 || dup2(err[1], 2) < 0) _exit(125);
            }
            struct rlimit limit;
            if (r->nproc > 0) { limit.rlim_cur = limit.rlim_max = (rlim_t)r->nproc; setrlimit(RLIMIT_NPROC, &limit); }
            if (r->nofile > 0) { limit.rlim_cur = limit.rlim_max = (rlim_t)r->nofile; setrlimit(RLIMIT_NOFILE, &limit); }
            if (setgroups(0, NULL) != 0 || setgid(r->gid) != 0 || setuid(r->uid) != 0) _exit(125);
            if (chdir(r->cwd) != 0) { dprintf(2, "cove-init: cannot enter %s: %s\n", r->cwd, strerror(errno)); _exit(125); }
            drop_capabilities();
            if (r->umask_set) umask(r->umask);
            for (int sig = 1; sig < 32; sig++) signal(sig, SIG_DFL);
            r->envp[r->envc] = NULL;
            execve(argv[0], argv, r->envp);
            dprintf(2, "cove-init: cannot run %s: %s\n", argv[0], strerror(errno));
            _exit(127);
        }
        exec_close_ends(out[1], err[1], in[0], slave);
        exec_close_ends(in[1], master, -1, -1);  /* the program's input ends when PID 1 closes it, not this */
        program = pid;
        sigprocmask(SIG_UNBLOCK, &term, NULL);
        int status;
        siginfo_t info;
        while (waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT) < 0) if (errno != EINTR) _exit(125);
        if (killed) kill_session(proc, pid);  /* its pid stays taken until it is reaped */
        while (waitpid(pid, &status, 0) < 0) if (errno != EINTR) _exit(125);
        _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
    }
    sigprocmask(SIG_UNBLOCK, &term, NULL);
    exec_close_ends(out[1], err[1], in[0], slave);
    if (waiter < 0) {
        exec_close_ends(out[0], err[0], in[1], -1);
        free(inbuf);
        dprintf(ctl, "r%lu:fork: %s\n", id, strerror(errno));
        return;
    }
    for (int i = 0; i < 3; i++) if ((int[]){out[0], err[0], in[1]}[i] >= 0) fcntl((int[]){out[0], err[0], in[1]}[i], F_SETFL, O_NONBLOCK);
    execs[slot] = (struct exec){.id = id, .waiter = waiter, .out = out[0], .err = err[0], .in = in[1], .tty = master >= 0, .inbuf = inbuf};
}

/* Relay what a started program wrote: 1 if there may be more. Once its waiter is reaped, what is in
 * the pipes is sent and they are closed (a child it left behind writes no more to the host). */
static int exec_drain(struct exec *e, int *fd, char kind, int last) {
    unsigned char data[4096];
    ssize_t n = read(*fd, data, sizeof data);
    if (n > 0) { e->unacked += send_hex(kind, e->id, data, (size_t)n); return 1; }
    if (n < 0 && errno == EINTR) return 1;
    if (n < 0 && errno == EAGAIN && !last) return 0;
    close(*fd);  /* EOF, or EIO from a terminal nobody holds any more */
    *fd = -1;
    return 0;
}

static void exec_reaped(pid_t done, int status) {
    for (int i = 0; i < MAX_EXECS; i++) {
        struct exec *e = &execs[i];
        if (e->waiter != done) continue;
        /* a child left behind that still writes is not followed for ever: at most EXEC_DRAIN_MAX more */
        for (size_t sent = e->unacked; e->out >= 0;) if (exec_drain(e, &e->out, 'o', 1) && e->unacked - sent > 2 * EXEC_DRAIN_MAX) { close(e->out); e->out = -1; }
        for (size_t sent = e->unacked; e->err >= 0;) if (exec_drain(e, &e->err, 'e', 1) && e->unacked - sent > 2 * EXEC_DRAIN_MAX) { close(e->err); e->err = -1; }
        dprintf(ctl, "x%lu:%d\n", e->id, WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
        exec_close_ends(e->in, -1, -1, -1);
        free(e->inbuf);
        *e = (struct exec){0};
    }
}

static void host_line(char *line, pid_t child) {
    char *colon;
    struct exec_mode mode;
    unsigned short size[2];
    if (line[0] == 'S') kill(child, atoi(line + 1));
    else if (line[0] == 'T' && resize_pipe[1] >= 0 && window_size(line + 1, &size[0], &size[1]))
        write_all(resize_pipe[1], size, sizeof size);  /* the program's terminal: a new size */
    else if (line[0] == 'x' && (colon = strchr(line, ':'))) {
        if (exec_parse_mode(line + 1, colon, &mode)) exec_start(launched, child, strtoul(line + 1, NULL, 10), &mode, colon + 1);
        else dprintf(ctl, "r%lu:malformed request\n", strtoul(line + 1, NULL, 10));
    }
    else if (strchr("iwa", line[0]) && (colon = strchr(line, ':'))) exec_stream_line(line[0], strtoul(line + 1, NULL, 10), colon + 1);
    else if (line[0] == 'k') {
        unsigned long id = strtoul(line + 1, NULL, 10);
        for (int i = 0; i < MAX_EXECS; i++) if (execs[i].waiter && execs[i].id == id) kill(execs[i].waiter, SIGTERM);
    }
}

int main(void) {
    mkdir("/cove/dev", 0755);
    mkdir("/cove/sys", 0755);
    if (mount("devtmpfs", "/cove/dev", "devtmpfs", MS_NOSUID | MS_NOEXEC, NULL) != 0) die("mount devtmpfs");
    if (mount("sysfs", "/cove/sys", "sysfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("mount sysfs");
    int console = open("/cove/dev/console", O_WRONLY | O_CLOEXEC);
    if (console >= 0) { dup2(console, 2); close(console); }
    load_modules(0);
    ctl = open_port("cove.ctl", O_RDWR);
    uint32_t len;
    read_all(ctl, &len, sizeof len, 1);
    if (len == 0 || len > MAX_REQUEST) die("request of %u bytes refused", len);
    char *body = malloc(len);
    if (!body) die("out of memory");
    read_all(ctl, body, len, 0);
    static struct request r;
    parse(body, len, &r);
    launched = &r;
    if (r.probe) {
        dprintf(ctl, "X0\n");
        sync();
        reboot(RB_AUTOBOOT);
    }
    int in = open_port("cove.stdin", O_RDONLY);
    int out = open_port("cove.stdout", O_WRONLY);
    int err = open_port("cove.stderr", O_WRONLY);
    attestation_setup(r.attestation);
    umount2("/cove/sys", MNT_DETACH);
    if (strcmp(r.network, "host") == 0) load_modules(1);
    forget_modules();
    if (strcmp(r.network, "none") != 0) network_up(r.network);

    sigset_t mask;
    sigemptyset(&mask);
    sigaddset(&mask, SIGCHLD);
    sigprocmask(SIG_BLOCK, &mask, NULL);
    int children = signalfd(-1, &mask, SFD_CLOEXEC);
    if (r.tty && pipe2(resize_pipe, O_CLOEXEC | O_NONBLOCK) != 0) die("pipe: %s", strerror(errno));
    pid_t child = (pid_t)syscall(SYS_clone, CLONE_NEWPID | CLONE_NEWNS | CLONE_NEWUTS | CLONE_NEWIPC | SIGCHLD, NULL);
    if (child < 0) die("clone: %s", strerror(errno));
    if (child == 0) {
        sigprocmask(SIG_UNBLOCK, &mask, NULL);
        if (resize_pipe[1] >= 0) close(resize_pipe[1]);
        _exit(namespace_init(&r, in, out, err));
    }
    if (resize_pipe[0] >= 0) close(resize_pipe[0]);
    close(in);
    close(out);
    close(err);
    mkdir("/cove/proc", 0700);  /* after the clone: not in the program's mount namespace */
    if (mount("proc", "/cove/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) != 0) die("mount proc: %s", strerror(errno));
    int code = -1;
    struct pollfd fds[2 + 3 * MAX_EXECS];
    static char line[MAX_LINE];
    size_t used = 0;
    while (code < 0) {
        fds[0] = (struct pollfd){ctl, POLLIN, 0};
        fds[1] = (struct pollfd){children, POLLIN, 0};
        for (int i = 0; i < MAX_EXECS; i++) {  /* output while the host's window has room; input while some is held */
            struct exec *e = &execs[i];
            int room = e->waiter && e->unacked < EXEC_OUT_WINDOW;
            fds[2 + 3 * i] = (struct pollfd){room ? e->out : -1, POLLIN, 0};
            fds[3 + 3 * i] = (struct pollfd){room ? e->err : -1, POLLIN, 0};
            fds[4 + 3 * i] = (struct pollfd){e->waiter && e->inlen ? e->in : -1, POLLOUT, 0};
        }
        if (poll(fds, 2 + 3 * MAX_EXECS, -1) < 0) continue;
        if (fds[0].revents & POLLIN) {  /* "S<signal>", "x<id>:<hex>" and "k<id>" lines from the host */
            ssize_t n = read(ctl, line + used, sizeof line - 1 - used);
            if (n > 0) {
                used += (size_t)n;
                char *end;
                while ((end = memchr(line, '\n', used))) {
                    *end = 0;
                    host_line(line, child);
                    used -= (size_t)(end + 1 - line);
                    memmove(line, end + 1, used);
                }
                if (used == sizeof line - 1) used = 0;  /* an overlong line is dropped */
            }
        }
        for (int i = 0; i < MAX_EXECS; i++) {
            struct exec *e = &execs[i];
            if (!e->waiter) continue;
            if (e->out >= 0 && fds[2 + 3 * i].revents) exec_drain(e, &e->out, 'o', 0);
            if (e->err >= 0 && fds[3 + 3 * i].revents) exec_drain(e, &e->err, 'e', 0);
            if (e->in >= 0 && fds[4 + 3 * i].revents) exec_feed(e);
        }
        if (fds[1].revents & POLLIN) {
            struct signalfd_siginfo info;
            if (read(children, &info, sizeof info) < 0) continue;
            int status;
            pid_t done;
            while ((done = waitpid(-1, &status, WNOHANG)) > 0) {
                if (done == child) code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
                else exec_reaped(done, status);
            }
        }
    }
    dprintf(ctl, "X%d\n", code);
    sync();
    reboot(RB_AUTOBOOT);
    return 0;
}
