//! SSNTP's numbers: frame types, the operands of each type and the role bitmask, with the
//! values of ciao's Go `iota` constants (its README and comments disagree; the code wins).

use std::fmt;
use std::str::FromStr;

use crate::frame::{Frame, Header};

/// Version bits of `Header::major`; bit 7 flags a frame that carries a path trace.
pub const MAJOR: u8 = 0;
pub const MINOR: u8 = 1;
pub const TRACE_FLAG: u8 = 0x80;

/// The port ciao's scheduler listens on.
pub const DEFAULT_PORT: u16 = 8888;

macro_rules! operands {
    ($(#[$doc:meta])* $name:ident { $($variant:ident = $value:literal => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name { $($variant = $value),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn from_u8(v: u8) -> Option<Self> {
                match v { $($value => Some($name::$variant),)+ _ => None }
            }

            /// ciao's name for the operand, as its logs print it.
            pub fn name(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

operands!(
    /// `Header::kind`.
    FrameType {
        Command = 0 => "COMMAND",
        Status = 1 => "STATUS",
        Error = 2 => "ERROR",
        Event = 3 => "EVENT",
    }
);

operands!(Command {
    Connect = 0 => "CONNECT",
    Start = 1 => "START",
    Stats = 2 => "STATS",
    Evacuate = 3 => "EVACUATE",
    Delete = 4 => "DELETE",
    AssignPublicIp = 5 => "AssignPublicIP",
    ReleasePublicIp = 6 => "ReleasePublicIP",
    Configure = 7 => "CONFIGURE",
    AttachVolume = 8 => "AttachVolume",
    Restore = 9 => "Restore",
    RefreshCnci = 10 => "RefreshCNCI",
});

operands!(Status {
    Connected = 0 => "CONNECTED",
    Ready = 1 => "READY",
    Full = 2 => "FULL",
    Offline = 3 => "OFFLINE",
    Maintenance = 4 => "MAINTENANCE",
});

operands!(Event {
    TenantAdded = 0 => "TenantAdded",
    TenantRemoved = 1 => "TenantRemoved",
    InstanceDeleted = 2 => "InstanceDeleted",
    ConcentratorInstanceAdded = 3 => "ConcentratorInstanceAdded",
    PublicIpAssigned = 4 => "PublicIPAssigned",
    PublicIpUnassigned = 5 => "PublicIPUnassigned",
    TraceReport = 6 => "TraceReport",
    NodeConnected = 7 => "NodeConnected",
    NodeDisconnected = 8 => "NodeDisconnected",
    InstanceStopped = 9 => "InstanceStopped",
});

operands!(ErrorCode {
    InvalidFrameType = 0 => "InvalidFrameType",
    StartFailure = 1 => "StartFailure",
    ConnectionFailure = 2 => "ConnectionFailure",
    DeleteFailure = 3 => "DeleteFailure",
    ConnectionAborted = 4 => "ConnectionAborted",
    InvalidConfiguration = 5 => "InvalidConfiguration",
    AttachVolumeFailure = 6 => "AttachVolumeFailure",
    AssignPublicIpFailure = 7 => "AssignPublicIPFailure",
    UnassignPublicIpFailure = 8 => "UnassignPublicIPFailure",
});

/// A frame's type and operand together: what the frame means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Operation {
    Command(Command),
    Status(Status),
    Error(ErrorCode),
    Event(Event),
}

impl Operation {
    /// Every operation SSNTP defines, for tests and tools that must cover them all.
    pub fn all() -> impl Iterator<Item = Operation> {
        let c = Command::ALL.iter().map(|&c| Operation::Command(c));
        let s = Status::ALL.iter().map(|&s| Operation::Status(s));
        let e = ErrorCode::ALL.iter().map(|&e| Operation::Error(e));
        let v = Event::ALL.iter().map(|&v| Operation::Event(v));
        c.chain(s).chain(e).chain(v)
    }

    pub fn frame_type(self) -> FrameType {
        match self {
            Operation::Command(_) => FrameType::Command,
            Operation::Status(_) => FrameType::Status,
            Operation::Error(_) => FrameType::Error,
            Operation::Event(_) => FrameType::Event,
        }
    }

    pub fn operand(self) -> u8 {
        match self {
            Operation::Command(c) => c as u8,
            Operation::Status(s) => s as u8,
            Operation::Error(e) => e as u8,
            Operation::Event(v) => v as u8,
        }
    }

    /// `None` for an unknown frame type or an operand the type does not define.
    pub fn from_header(h: &Header) -> Option<Self> {
        match FrameType::from_u8(h.kind)? {
            FrameType::Command => Command::from_u8(h.operand).map(Operation::Command),
            FrameType::Status => Status::from_u8(h.operand).map(Operation::Status),
            FrameType::Error => ErrorCode::from_u8(h.operand).map(Operation::Error),
            FrameType::Event => Event::from_u8(h.operand).map(Operation::Event),
        }
    }

    pub fn header(self) -> Header {
        Header {
            major: MAJOR,
            minor: MINOR,
            kind: self.frame_type() as u8,
            operand: self.operand(),
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::Command(c) => write!(f, "COMMAND {c}"),
            Operation::Status(s) => write!(f, "STATUS {s}"),
            Operation::Error(e) => write!(f, "ERROR {e}"),
            Operation::Event(v) => write!(f, "EVENT {v}"),
        }
    }
}

impl Frame {
    /// A frame as a node first sends it: Origin = the sender, no trace.
    pub fn new(op: Operation, origin: uuid::Uuid, payload: Vec<u8>) -> Self {
        Frame {
            header: op.header(),
            origin: origin.into_bytes(),
            payload_length: payload.len() as u32,
            trace: None,
            payload,
        }
    }

    pub fn operation(&self) -> Option<Operation> {
        Operation::from_header(&self.header)
    }

    pub fn origin_uuid(&self) -> uuid::Uuid {
        uuid::Uuid::from_bytes(self.origin)
    }

    pub fn is_traced(&self) -> bool {
        self.header.major & TRACE_FLAG != 0
    }
}

/// A node's roles: bits of ciao's role bitmask. A certificate may carry several
/// (a compute node that is both AGENT and NETAGENT).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Role(pub u32);

/// One role: its bit, the last arc of its OID under 1.3.6.1.4.1.343.8, its name on the command
/// line, and the word ciao puts in certificate file names.
struct RoleDef {
    bit: u32,
    oid_arc: u64,
    name: &'static str,
    file_word: &'static str,
}

const ROLE_DEFS: &[RoleDef] = &[
    RoleDef {
        bit: 0x01,
        oid_arc: 5,
        name: "server",
        file_word: "Server",
    },
    RoleDef {
        bit: 0x02,
        oid_arc: 3,
        name: "controller",
        file_word: "Controller",
    },
    RoleDef {
        bit: 0x04,
        oid_arc: 1,
        name: "agent",
        file_word: "CNAgent",
    },
    RoleDef {
        bit: 0x08,
        oid_arc: 2,
        name: "scheduler",
        file_word: "Scheduler",
    },
    RoleDef {
        bit: 0x10,
        oid_arc: 4,
        name: "netagent",
        file_word: "NetworkingAgent",
    },
    RoleDef {
        bit: 0x20,
        oid_arc: 6,
        name: "cnciagent",
        file_word: "CNCIAgent",
    },
];

/// The OID arcs every role OID starts with (ciao's private enterprise arc).
pub const ROLE_OID_PREFIX: [u64; 8] = [1, 3, 6, 1, 4, 1, 343, 8];

impl Role {
    pub const NONE: Role = Role(0);
    pub const SERVER: Role = Role(0x01);
    pub const CONTROLLER: Role = Role(0x02);
    pub const AGENT: Role = Role(0x04);
    pub const SCHEDULER: Role = Role(0x08);
    pub const NETAGENT: Role = Role(0x10);
    pub const CNCIAGENT: Role = Role(0x20);

    pub fn bits(self) -> u32 {
        self.0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// True when every bit of `other` is set here.
    pub fn contains(self, other: Role) -> bool {
        self.0 & other.0 == other.0
    }

    pub fn intersects(self, other: Role) -> bool {
        self.0 & other.0 != 0
    }

    /// Bits that no role defines.
    pub fn unknown_bits(self) -> u32 {
        self.0 & !ROLE_DEFS.iter().fold(0, |a, d| a | d.bit)
    }

    fn defs(self) -> impl Iterator<Item = &'static RoleDef> {
        ROLE_DEFS.iter().filter(move |d| self.0 & d.bit != 0)
    }

    /// The full OID arcs of each role set here.
    pub fn oids(self) -> Vec<Vec<u64>> {
        self.defs()
            .map(|d| {
                let mut arcs = ROLE_OID_PREFIX.to_vec();
                arcs.push(d.oid_arc);
                arcs
            })
            .collect()
    }

    /// The role an OID names, if it is one of ciao's.
    pub fn from_oid(arcs: &[u64]) -> Option<Role> {
        let (last, prefix) = arcs.split_last()?;
        if prefix != ROLE_OID_PREFIX {
            return None;
        }
        ROLE_DEFS
            .iter()
            .find(|d| d.oid_arc == *last)
            .map(|d| Role(d.bit))
    }

    /// ciao's certificate file name part: `CNAgent-NetworkingAgent`.
    pub fn file_words(self) -> String {
        self.defs()
            .map(|d| d.file_word)
            .collect::<Vec<_>>()
            .join("-")
    }
}

impl std::ops::BitOr for Role {
    type Output = Role;
    fn bitor(self, rhs: Role) -> Role {
        Role(self.0 | rhs.0)
    }
}

impl std::ops::BitOrAssign for Role {
    fn bitor_assign(&mut self, rhs: Role) {
        self.0 |= rhs.0;
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("none");
        }
        let mut first = true;
        for d in self.defs() {
            if !first {
                f.write_str("|")?;
            }
            f.write_str(d.name)?;
            first = false;
        }
        if self.unknown_bits() != 0 {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{:#x}", self.unknown_bits())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Role({self})")
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown role {0:?} (expected one of server, controller, agent, scheduler, netagent, cnciagent)"
)]
pub struct UnknownRole(pub String);

impl FromStr for Role {
    type Err = UnknownRole;

    /// `agent`, `agent|netagent` or `agent,netagent` (case-insensitive).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut role = Role::NONE;
        for word in s.split([',', '|']).map(str::trim) {
            let d = ROLE_DEFS
                .iter()
                .find(|d| d.name.eq_ignore_ascii_case(word))
                .ok_or_else(|| UnknownRole(word.to_string()))?;
            role |= Role(d.bit);
        }
        Ok(role)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_constant_values() {
        assert_eq!(FrameType::Error as u8, 2);
        assert_eq!(FrameType::Event as u8, 3);
        assert_eq!(Command::RefreshCnci as u8, 10);
        assert_eq!(Event::NodeDisconnected as u8, 8);
        assert_eq!(ErrorCode::UnassignPublicIpFailure as u8, 8);
        assert_eq!(Status::Maintenance as u8, 4);
        assert_eq!(Operation::all().count(), 11 + 5 + 9 + 10);
    }

    #[test]
    fn header_round_trip_and_unknowns() {
        for op in Operation::all() {
            assert_eq!(Operation::from_header(&op.header()), Some(op));
        }
        let bad_type = Header {
            kind: 4,
            ..Default::default()
        };
        assert_eq!(Operation::from_header(&bad_type), None);
        let bad_operand = Header {
            kind: 3,
            operand: 10,
            ..Default::default()
        };
        assert_eq!(Operation::from_header(&bad_operand), None);
    }

    #[test]
    fn roles_oids_names() {
        let r: Role = "agent|NetAgent".parse().unwrap();
        assert_eq!(r, Role::AGENT | Role::NETAGENT);
        assert_eq!(r.to_string(), "agent|netagent");
        assert_eq!(r.file_words(), "CNAgent-NetworkingAgent");
        assert_eq!(
            Role::from_oid(&[1, 3, 6, 1, 4, 1, 343, 8, 6]),
            Some(Role::CNCIAGENT)
        );
        assert_eq!(Role::from_oid(&[1, 3, 6, 1, 4, 1, 343, 9, 6]), None);
        assert_eq!(
            Role::SCHEDULER.oids(),
            vec![vec![1, 3, 6, 1, 4, 1, 343, 8, 2]]
        );
        assert!("agent,bogus".parse::<Role>().is_err());
        assert_eq!(Role(0x45).to_string(), "server|agent|0x40");
    }
}
