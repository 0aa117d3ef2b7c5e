//! The OAuth 2.0 refresh-token grant refresher (RFC 6749 §6).
