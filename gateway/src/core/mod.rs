//! The sans-IO core of the tunnel: packet parsing, framing, policy and MTU decisions as plain
//! functions and state machines. No sockets, no clock reads: time comes in as an argument.

pub mod advertise;
pub mod checksum;
pub mod cidr;
pub mod control;
pub mod dns;
pub mod frame;
pub mod icmp;
pub mod limits;
pub mod mss;
pub mod packet;
pub mod policy;
pub mod resolver;
pub mod text;
