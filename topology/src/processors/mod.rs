//! Processor types, one module each: params, runtime and tests side by side.

pub mod amount_limit;
pub mod command_decoder;
pub mod merchant_notifier;
pub mod payment_state_machine;
pub mod refund_state_machine;
