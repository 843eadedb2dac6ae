//! Enums stored as text and mirrored by proto enums.

/// Defines a text-backed enum mirrored by a proto enum, with its
/// conversions both ways. Proto value 0 (UNSPECIFIED) has no domain value.
macro_rules! wire_enum {
    ($name:ident, $proto:ty, { $($variant:ident = $text:literal),+ $(,)? }) => {
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text),+ }
            }

            pub fn from_db(s: &str) -> crate::error::Result<Self> {
                match s {
                    $($text => Ok($name::$variant),)+
                    other => Err(crate::error::Error::Internal(format!(
                        concat!("unknown ", stringify!($name), " {:?} in the database"), other))),
                }
            }

            pub fn from_proto(v: i32) -> Option<Self> {
                match <$proto>::try_from(v).ok()? {
                    $(<$proto>::$variant => Some($name::$variant),)+
                    _ => None,
                }
            }

            pub fn to_proto(self) -> $proto {
                match self { $($name::$variant => <$proto>::$variant),+ }
            }
        }
    };
}
pub(crate) use wire_enum;
