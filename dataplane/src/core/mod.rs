//! The sans-IO forwarding core: every decision about a packet, and what it counts. Nothing
//! here touches a socket, a device, a file or the clock; the data path hands it bytes and the
//! time and acts on what it returns.

pub mod batch;
pub mod bucket;
pub mod drops;
pub mod dropwatch;
pub mod forward;
pub mod lpm;
pub mod nflog;
pub mod policy;
pub mod policy_table;
pub mod reason;
pub mod routing;
pub mod table;
pub mod why;
