pub mod domain;
pub mod render;
