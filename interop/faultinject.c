/* An LD_PRELOAD shim that makes chosen file operations of one process fail on demand,
 * for test_disk_faults.py: I/O errors and short writes that a real disk gives only when it
 * is failing, without root or a special device.
 *
 * ZEORS_FAULT_DIR names a control directory and ZEORS_FAULT_FILE the suffix of the path
 * whose operations are affected (e.g. "Data.fs"). For each pwrite64, fdatasync, fsync
 * or ftruncate64 on such a file the shim looks for a control file named after the
 * operation in that directory. If there is none, the call goes through. Otherwise its
 * content, "ERRNO [skip=N] [short]", says what to do: let N more calls through (counting
 * down in the file), then fail with ERRNO; with "short", a write first writes half of
 * its bytes and returns that count, as a filling disk does, and only a write of a single
 * byte fails. Removing the control file ends the fault.
 *
 * Every decision is counted, so that a test can show its fault fired: one line per call
 * is appended to "OP.log" in the control directory — "skip" for a call let through by
 * skip=N, "short" for a shortened write, "fail" for a call that failed with ERRNO.
 *
 * Build: cc -shared -fPIC -O2 -o faultinject.so faultinject.c -ldl
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

struct fault {
    int err;
    int shorten;
};

static int is_target(int fd)
{
    const char *suffix = getenv("ZEORS_FAULT_FILE");
    char link[64], path[4096];
    ssize_t n;
    size_t s;

    if (!suffix)
        return 0;
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    n = readlink(link, path, sizeof path - 1);
    if (n < 0)
        return 0;
    path[n] = 0;
    s = strlen(suffix);
    return (size_t)n >= s && strcmp(path + n - s, suffix) == 0;
}

/* Appends `what` as a line to DIR/OP.log (errno is kept). */
static void record(const char *op, const char *what)
{
    const char *dir = getenv("ZEORS_FAULT_DIR");
    char path[4096];
    int saved = errno;
    FILE *fp;

    if (!dir)
        return;
    snprintf(path, sizeof path, "%s/%s.log", dir, op);
    fp = fopen(path, "a");
    if (fp) {
        fprintf(fp, "%s\n", what);
        fclose(fp);
    }
    errno = saved;
}

/* What to do for `op` on `fd`: err == 0 means "go through". Calls that a fault lets
 * through with skip=N are recorded here; the caller records what it injects. */
static struct fault fault_for(const char *op, int fd)
{
    struct fault f = {0, 0};
    const char *dir = getenv("ZEORS_FAULT_DIR");
    char ctl[4096], line[256];
    int err = 0, skip = 0, saved = errno;
    FILE *fp;

    if (!dir || !is_target(fd))
        return f;
    snprintf(ctl, sizeof ctl, "%s/%s", dir, op);
    fp = fopen(ctl, "r");
    if (!fp) {
        errno = saved;
        return f;
    }
    if (!fgets(line, sizeof line, fp))
        line[0] = 0;
    fclose(fp);
    if (sscanf(line, "%d", &err) != 1 || err <= 0)
        err = EIO;
    char *p = strstr(line, "skip=");
    if (p)
        skip = atoi(p + 5);
    if (skip > 0) {
        fp = fopen(ctl, "w");
        if (fp) {
            fprintf(fp, "%d skip=%d%s\n", err, skip - 1, strstr(line, "short") ? " short" : "");
            fclose(fp);
        }
        record(op, "skip");
        errno = saved;
        return f;
    }
    f.err = err;
    f.shorten = strstr(line, "short") != NULL;
    errno = saved;
    return f;
}

#define REAL(name, ret, ...)                                  \
    static ret (*real)(__VA_ARGS__);                          \
    if (!real)                                                \
        real = (ret(*)(__VA_ARGS__))dlsym(RTLD_NEXT, name);

ssize_t pwrite64(int fd, const void *buf, size_t count, off64_t off)
{
    REAL("pwrite64", ssize_t, int, const void *, size_t, off64_t)
    struct fault f = fault_for("pwrite", fd);
    if (f.err) {
        if (f.shorten && count > 1) {
            record("pwrite", "short");
            return real(fd, buf, count / 2, off);
        }
        record("pwrite", "fail");
        errno = f.err;
        return -1;
    }
    return real(fd, buf, count, off);
}

ssize_t pwrite(int fd, const void *buf, size_t count, off_t off)
{
    return pwrite64(fd, buf, count, off);
}

int fdatasync(int fd)
{
    REAL("fdatasync", int, int)
    struct fault f = fault_for("fdatasync", fd);
    if (f.err) {
        record("fdatasync", "fail");
        errno = f.err;
        return -1;
    }
    return real(fd);
}

int fsync(int fd)
{
    REAL("fsync", int, int)
    struct fault f = fault_for("fsync", fd);
    if (f.err) {
        record("fsync", "fail");
        errno = f.err;
        return -1;
    }
    return real(fd);
}

int ftruncate64(int fd, off64_t len)
{
    REAL("ftruncate64", int, int, off64_t)
    struct fault f = fault_for("ftruncate", fd);
    if (f.err) {
        record("ftruncate", "fail");
        errno = f.err;
        return -1;
    }
    return real(fd, len);
}

int ftruncate(int fd, off_t len)
{
    return ftruncate64(fd, len);
}
