import Glibc

nonisolated(unsafe) private var pendingSignal: sig_atomic_t = 0

/// SIGINT, SIGTERM and SIGHUP turned into an error at the next wait, so that a command which
/// writes files on the host (a pull) or makes a domain (create) unwinds and removes what it
/// had not finished, instead of dying with it left behind. Only commands that call
/// `install()` are affected; the host's waits and loops look at ``pending``.
public enum Interruption {
    public static let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]

    /// Catches the signals; the handler only records which one came. They are unblocked too:
    /// a parent may have started this process with them blocked.
    public static func install() {
        var unblock = sigset_t()
        sigemptyset(&unblock)
        for sig in signals { sigaddset(&unblock, sig) }
        sigprocmask(SIG_UNBLOCK, &unblock, nil)
        for sig in signals {
            var action = sigaction()
            action.__sigaction_handler.sa_handler = { sig in pendingSignal = sig }
            sigemptyset(&action.sa_mask)
            action.sa_flags = 0 // no SA_RESTART: a blocking wait returns EINTR and looks
            sigaction(sig, &action, nil)
        }
    }

    /// The signal that arrived, if any.
    public static var pending: Int32? { pendingSignal == 0 ? nil : Int32(pendingSignal) }

    /// What stopped the command, for its error: "interrupted by SIGINT".
    public static func describe(_ sig: Int32) -> String {
        "interrupted by \(sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : sig == SIGHUP ? "SIGHUP" : "signal \(sig)")"
    }
}
