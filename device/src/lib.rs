#![doc = include_str!("../README.md")]

pub mod activation;
pub mod backoff;
pub mod codec;
pub mod connector;
pub mod credentials;
pub mod error;
pub mod link;
pub mod reconnect;
pub mod redirect;
pub mod seen;

pub use activation::{activate, activate_via};
pub use backoff::Backoff;
pub use connector::{Connector, resolve};
pub use courier_proto::device::{GoodbyeReason, Notification};
pub use credentials::{DeviceCredentials, DeviceEndpoint};
pub use error::ClientError;
pub use link::{DeviceLink, LinkEvent, MAX_REDIRECTS};
pub use reconnect::{Device, DeviceEvent};
pub use redirect::RedirectTarget;
pub use seen::{DEFAULT_SEEN, SeenIds};
