// The agent's process start. glibc's posix_spawn resets every signal one by one in the child
// (over a hundred sigaction calls); under TCG that alone cost 0.8 ms of each exec. Here the
// child resets only the signals the caller names, then executes the program.
#define _GNU_SOURCE
#include "CSpawn.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
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

// Tries each folder of the search path in turn, the way execvp does: a folder where the file
// exists but cannot be run is remembered, and reported if no later folder has it.
static int exec_searching(const vc_spawn_request *r) {
    if (strchr(r->file, '/')) {
        execve(r->file, r->argv, r->envp);
        return errno;
    }
    size_t name = strlen(r->file);
    int found_unusable = 0;
    const char *p = r->search_path ? r->search_path : "";
    char candidate[PATH_MAX];
    for (;;) {
        const char *end = strchrnul(p, ':');
        size_t dir = (size_t)(end - p);
        if (dir + 1 + name < sizeof candidate) {
            // An empty entry is the working folder.
            if (dir == 0) { candidate[0] = '.'; dir = 1; } else { memcpy(candidate, p, dir); }
            candidate[dir] = '/';
            memcpy(candidate + dir + 1, r->file, name + 1);
            execve(candidate, r->argv, r->envp);
            switch (errno) {
            case EACCES: found_unusable = 1; break;
            case ENOENT: case ENOTDIR: case ESTALE: case ENODEV: case ETIMEDOUT: case ELOOP: case ENAMETOOLONG: break;
            default: return errno;
            }
        }
        if (*end == '\0') break;
        p = end + 1;
    }
    return found_unusable ? EACCES : ENOENT;
}

// Runs in the vfork child, on the parent's stack and memory: only system calls, then execve
// or _exit.
static void child(const vc_spawn_request *r, struct outcome *out) {
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
    out->stage = VC_SPAWN_EXEC;
    out->error = exec_searching(r);
    _exit(127);
failed:
    out->stage = stage;
    out->error = errno;
    _exit(127);
}

int vc_spawn(const vc_spawn_request *request, pid_t *pid, int *stage) {
    struct outcome out = { 0, VC_SPAWN_EXEC };
    // No handler may run in the child while it shares the parent's memory.
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    pid_t p = vfork();
    if (p == 0) child(request, &out);
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
