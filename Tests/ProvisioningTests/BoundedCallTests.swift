import Foundation
import Synchronization
import Testing
@testable import VirtchanProvisioning

/// A call that never returns in time is given up on, and what it makes later is discarded;
/// one that returns in time hands over its value or its error, and discards nothing. Waiting
/// again for a call that has returned returns at once.
@Suite struct BoundedCallTests {
    @Test(.timeLimit(.minutes(1))) func aCallGivenUpOnHasWhatItMakesLaterDiscarded() {
        let release = DispatchSemaphore(value: 0)
        let discarded = Mutex<[Int]>([])
        let call = BoundedCall<Int>(name: "test-slow", {
            release.wait()
            return .success(42)
        }, discard: { value in discarded.withLock { $0.append(value) } })
        let start = Date()
        guard case .gaveUp = call.wait(seconds: 0.2) else {
            Issue.record("a call still blocked was not given up on")
            release.signal()
            return
        }
        #expect(Date().timeIntervalSince(start) < 5)
        release.signal()
        call.waitUntilReturned()
        #expect(discarded.withLock { $0 } == [42])
        // Given up on stays given up on, whatever the call did since.
        guard case .gaveUp = call.wait(seconds: 0) else { Issue.record("the outcome changed after giving up"); return }
    }

    @Test(.timeLimit(.minutes(1))) func aCallThatReturnsInTimeHandsOverItsResult() {
        let discarded = Mutex(0)
        let ok = BoundedCall<Int>(name: "test-ok", { .success(7) }, discard: { _ in discarded.withLock { $0 += 1 } })
        guard case .finished(.success(let value)) = ok.wait(seconds: 10) else { Issue.record("no value"); return }
        #expect(value == 7)
        let failing = BoundedCall<Int>(name: "test-fail", { .failure(ProvisioningError(.connection, "refused")) },
                                       discard: { _ in discarded.withLock { $0 += 1 } })
        guard case .finished(.failure(let error)) = failing.wait(seconds: 10) else { Issue.record("no error"); return }
        #expect(error.message == "refused")
        ok.waitUntilReturned()
        failing.waitUntilReturned()
        #expect(discarded.withLock { $0 } == 0)
    }
}
