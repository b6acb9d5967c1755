//! The WebSocket close codes a session decides on.

/// WebSocket close codes the session decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: the client asked (`CloseStream`) or went away.
    Normal,
    /// 1001: the server is shutting down.
    GoingAway,
    /// 1003: the data is not a format voxgate can decode.
    Unsupported,
    /// 1008: a policy was violated (idle timeout, session too long, limits).
    Policy,
    /// 1009: a message or element was too big.
    TooBig,
    /// 1011: an internal error.
    Internal,
    /// 1013: try again later (a dependency such as the delivery bus is unavailable).
    TryAgainLater,
}

impl CloseCode {
    pub fn as_u16(self) -> u16 {
        match self {
            Self::Normal => 1000,
            Self::GoingAway => 1001,
            Self::Unsupported => 1003,
            Self::Policy => 1008,
            Self::TooBig => 1009,
            Self::Internal => 1011,
            Self::TryAgainLater => 1013,
        }
    }
}
