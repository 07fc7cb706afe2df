//! quicklane's load generators and benchmark harness.

pub mod load;
