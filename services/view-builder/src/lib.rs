//! view-builder
