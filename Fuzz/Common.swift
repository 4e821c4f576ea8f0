import VirtchanProtocol

/// Decodes `payload` as message `M`; whatever decodes must encode and decode to itself.
func roundTrip<M: WireMessage & Equatable>(_: M.Type, _ payload: [UInt8]) {
    guard let message = try? M.decode(Frame(M.type, id: 7, payload: payload)) else { return }
    guard let again = try? M.decode(message.frame(id: 7)) else { preconditionFailure("\(M.self) did not decode its own encoding") }
    precondition(again == message, "\(M.self) changed in a round trip")
}

/// The frame's payload through every message decoder the host or the agent has.
func decodeEveryMessage(_ frame: Frame) {
    let p = frame.payload
    roundTrip(Hello.self, p); roundTrip(HelloAck.self, p); roundTrip(AuthProof.self, p); roundTrip(Info.self, p)
    roundTrip(ErrorMessage.self, p); roundTrip(ExecStart.self, p); roundTrip(ExecStarted.self, p)
    roundTrip(ExecSignal.self, p); roundTrip(ExecResize.self, p); roundTrip(ExecExit.self, p)
    roundTrip(PushRequest.self, p); roundTrip(PullRequest.self, p); roundTrip(DataReady.self, p)
    roundTrip(DataEnd.self, p); roundTrip(TransferDone.self, p); roundTrip(StatRequest.self, p)
    roundTrip(StatReply.self, p); roundTrip(MkdirRequest.self, p); roundTrip(SymlinkRequest.self, p)
    roundTrip(ListTree.self, p); roundTrip(TreeEntries.self, p)
}
