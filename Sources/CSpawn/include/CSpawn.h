#ifndef CSPAWN_H
#define CSPAWN_H

#include <signal.h>
#include <sys/types.h>

/// What the agent's child is to be: its program, arguments, environment, where its standard
/// streams come from, and which signal dispositions it must not inherit.
typedef struct {
    /// A path (it has a '/'), or a name looked up in `search_path`.
    const char *file;
    /// Colon-separated folders for a name: the child's own PATH.
    const char *search_path;
    char *const *argv;
    char *const *envp;
    /// The child's working folder; NULL: the agent's (the agent always names one).
    const char *cwd;
    /// A pseudo-terminal's slave: opened as 0, 1 and 2 in a new session, whose controlling
    /// terminal it becomes. NULL: `stdin_fd`, `stdout_fd` and `stderr_fd` become 0, 1 and 2,
    /// and the child leads a new process group.
    const char *tty;
    int stdin_fd, stdout_fd, stderr_fd;
    /// Set back to their default action in the child (every signal the agent handles, and
    /// those it ignores that a program expects at their default, such as SIGPIPE).
    const sigset_t *reset;
} vc_spawn_request;

/// Where a failed spawn failed.
enum { VC_SPAWN_EXEC = 0, VC_SPAWN_CWD = 1, VC_SPAWN_STDIO = 2, VC_SPAWN_FORK = 3 };

/// Starts the child with vfork and execve. Returns 0 and its pid in `*pid`, or an errno value
/// and where it failed in `*stage`; a child that failed has been reaped.
int vc_spawn(const vc_spawn_request *request, pid_t *pid, int *stage);

/// Adds to `set` every signal that has a handler in this process.
void vc_add_handled_signals(sigset_t *set);

/// pipe2, which the Glibc module does not export: `flags` may hold O_CLOEXEC and O_NONBLOCK.
int vc_pipe2(int fds[2], int flags);

#endif
