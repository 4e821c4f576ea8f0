import Foundation
import Synchronization

/// A libvirt call that may never return (a daemon that stopped answering, a channel another
/// client keeps), run on a thread of its own so that its caller can stop waiting. libvirt's
/// calls cannot be cancelled: one given up on goes on, and `discard` gets what it returns if
/// it ever succeeds, so that nothing it made (a connection, a stream) is left open.
///
/// `body` runs on the new thread and must read libvirt's error there (it is per thread).
final class BoundedCall<Value: Sendable>: @unchecked Sendable {
    enum Outcome {
        case finished(Result<Value, ProvisioningError>)
        case gaveUp
    }

    private let state = Mutex<Outcome?>(nil)
    /// Signalled once the call has returned, and kept signalled: every wait takes the signal
    /// and gives it back.
    private let done = DispatchSemaphore(value: 0)

    init(name: String, _ body: @escaping @Sendable () -> Result<Value, ProvisioningError>,
         discard: @escaping @Sendable (Value) -> Void) {
        let thread = Thread { [self] in
            let result = body()
            let abandoned = state.withLock { (outcome: inout Outcome?) -> Bool in
                if case .gaveUp = outcome { return true }
                outcome = .finished(result)
                return false
            }
            if abandoned, case .success(let value) = result { discard(value) }
            done.signal()
        }
        thread.name = name
        thread.start()
    }

    /// The call's result, or `.gaveUp` when it did not return within `seconds` (from then
    /// on, its result is discarded).
    func wait(seconds: Double) -> Outcome {
        if done.wait(timeout: .now() + seconds) == .success { done.signal() }
        return state.withLock { (outcome: inout Outcome?) -> Outcome in
            if let outcome { return outcome }
            outcome = .gaveUp
            return .gaveUp
        }
    }

    /// Blocks until the call has returned (and, given up on, discarded what it made).
    func waitUntilReturned() {
        done.wait()
        done.signal()
    }
}
