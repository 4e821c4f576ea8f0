// The agent's process start. glibc's posix_spawn resets every signal one by one in the child
// (over a hundred sigaction calls); under TCG that alone cost 0.8 ms of each exec. Here the
// child resets only the signals the caller names, then executes the program.
#define _GNU_SOURCE
#include "CSpawn.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

struct outcome {
    volatile int error;
    volatile int stage;
};

// Gives `from` to the child as `to`; a descriptor already in place loses close-on-exec.
static int place(int from, int to) {
    if (from == to) return fcntl(to, F_SETFD, 0);
    return dup2(from, to) < 0 ? -1 : 0;
}

// Finds `r->file` in the search path the way execvp does, but before the child starts and with
// stat rather than execve: a failed execve costs the kernel a new address space and a copy of
// the arguments (90 us each under TCG, against the 0.4 ms a whole spawn takes), and a command
// in the last folder of PATH made five of them. A folder where the name exists but cannot be
// run is remembered and reported if no later folder has it. A relative folder is taken from
// the command's working folder.
static int look_up(const vc_spawn_request *r, char *found, size_t size) {
    size_t name = strlen(r->file);
    if (strchr(r->file, '/')) {
        if (name + 1 > size) return ENAMETOOLONG;
        memcpy(found, r->file, name + 1);
        return 0;
    }
    int found_unusable = 0;
    const char *p = r->search_path ? r->search_path : "";
    for (;;) {
        const char *end = strchrnul(p, ':');
        size_t dir = (size_t)(end - p);
        const char *base = "";
        size_t base_length = 0;
        if (dir == 0 || p[0] != '/') {
            // An empty entry is the working folder itself.
            base = r->cwd ? r->cwd : ".";
            base_length = strlen(base);
        }
        if (base_length + 1 + dir + 1 + name < size) {
            char *out = found;
            if (base_length) { memcpy(out, base, base_length); out += base_length; if (dir) *out++ = '/'; }
            memcpy(out, p, dir);
            out += dir;
            *out++ = '/';
            memcpy(out, r->file, name + 1);
            struct stat st;
            if (stat(found, &st) == 0) {
                if (S_ISREG(st.st_mode) && faccessat(AT_FDCWD, found, X_OK, AT_EACCESS) == 0) return 0;
                found_unusable = 1;
            } else if (errno == EACCES) {
                found_unusable = 1;
            }
        }
        if (*end == '\0') break;
        p = end + 1;
    }
    return found_unusable ? EACCES : ENOENT;
}

// Runs in the vfork child, on the parent's stack and memory: only system calls, then execve
// or _exit.
static void child(const vc_spawn_request *r, const char *program, struct outcome *out) {
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++) {
        if (sigismember(r->reset, sig) == 1) sigaction(sig, &dfl, NULL);
    }
    int stage = VC_SPAWN_STDIO;
    if (r->tty) {
        int fd;
        if (setsid() < 0 || (fd = open(r->tty, O_RDWR)) < 0) goto failed;
        if (place(fd, 0) < 0 || place(fd, 1) < 0 || place(fd, 2) < 0) goto failed;
        if (fd > 2) close(fd);
    } else {
        if (setpgid(0, 0) < 0) goto failed;
        if (place(r->stdin_fd, 0) < 0 || place(r->stdout_fd, 1) < 0 || place(r->stderr_fd, 2) < 0) goto failed;
    }
    stage = VC_SPAWN_CWD;
    if (r->cwd && chdir(r->cwd) < 0) goto failed;
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, NULL);
    execve(program, r->argv, r->envp);
    out->stage = VC_SPAWN_EXEC;
    out->error = errno;
    _exit(127);
failed:
    out->stage = stage;
    out->error = errno;
    _exit(127);
}

int vc_spawn(const vc_spawn_request *request, pid_t *pid, int *stage) {
    struct outcome out = { 0, VC_SPAWN_EXEC };
    char program[PATH_MAX];
    int missing = look_up(request, program, sizeof program);
    if (missing) {
        *stage = VC_SPAWN_EXEC;
        return missing;
    }
    // No handler may run in the child while it shares the parent's memory.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t p = vfork();
    if (p == 0) child(request, program, &out);
    int saved = errno;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (p < 0) {
        *stage = VC_SPAWN_FORK;
        return saved;
    }
    if (out.error != 0) {
        int status;
        while (waitpid(p, &status, 0) < 0 && errno == EINTR) {}
        *stage = out.stage;
        return out.error;
    }
    *pid = p;
    return 0;
}

void vc_add_handled_signals(sigset_t *set) {
    for (int sig = 1; sig < NSIG; sig++) {
        struct sigaction current;
        if (sigaction(sig, NULL, &current) != 0) continue;
        if (current.sa_handler != SIG_DFL && current.sa_handler != SIG_IGN) sigaddset(set, sig);
    }
}

int vc_pipe2(int fds[2], int flags) {
    return pipe2(fds, flags);
}
