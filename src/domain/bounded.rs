//! Deserializers that stop at a bound instead of building whatever the input describes: a
//! submission is hostile input, and a list of a million empty strings must cost an error, not a
//! million allocations. Used by [`super::NewEmail`]'s fields.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// A list of at most `N` items (`deserialize_with = "bounded::list::<_, _, N>"`).
pub fn list<'de, D, T, const N: usize>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    struct V<T, const N: usize>(PhantomData<T>);
    impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for V<T, N> {
        type Value = Vec<T>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "a list of at most {N} items")
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<T>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(N).min(64));
            while let Some(x) = seq.next_element()? {
                if out.len() == N {
                    return Err(de::Error::custom(format!("more than {N} items")));
                }
                out.push(x);
            }
            Ok(out)
        }
    }
    d.deserialize_seq(V::<T, N>(PhantomData))
}

/// A string-to-string map of at most `N` entries.
pub fn map<'de, D, const N: usize>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: Deserializer<'de>,
{
    struct V<const N: usize>;
    impl<'de, const N: usize> Visitor<'de> for V<N> {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            write!(f, "an object of at most {N} string entries")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
            let mut out = BTreeMap::new();
            while let Some((k, v)) = m.next_entry::<String, String>()? {
                if out.len() == N {
                    return Err(de::Error::custom(format!("more than {N} entries")));
                }
                out.insert(k, v);
            }
            Ok(out)
        }
    }
    d.deserialize_map(V::<N>)
}

/// Template variables: any JSON, but at most [`MAX_VARIABLE_VALUES`] values, nested at most
/// [`MAX_VARIABLE_DEPTH`] deep.
pub fn variables<'de, D>(d: D) -> Result<Option<Value>, D::Error>
where
    D: Deserializer<'de>,
{
    let left = Cell::new(MAX_VARIABLE_VALUES);
    Wrap::deserialize_seed(d, &left).map(|o| o.map(|w| w.0))
}

/// Values in one email's template variables.
pub const MAX_VARIABLE_VALUES: usize = 10_000;
/// Nesting of one email's template variables.
pub const MAX_VARIABLE_DEPTH: usize = 32;

struct Wrap(Value);

impl Wrap {
    fn deserialize_seed<'de, D: Deserializer<'de>>(
        d: D,
        left: &Cell<usize>,
    ) -> Result<Option<Wrap>, D::Error> {
        struct Opt<'a>(&'a Cell<usize>);
        impl<'de> Visitor<'de> for Opt<'_> {
            type Value = Option<Wrap>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("template variables (a JSON object) or null")
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                Budget {
                    left: self.0,
                    depth: 0,
                }
                .deserialize(d)
                .map(|v| Some(Wrap(v)))
            }
        }
        d.deserialize_option(Opt(left))
    }
}

/// Builds a `Value`, spending one unit of `left` per value and refusing more depth than allowed.
struct Budget<'a> {
    left: &'a Cell<usize>,
    depth: usize,
}

impl Budget<'_> {
    fn spend<E: de::Error>(&self) -> Result<(), E> {
        match self.left.get().checked_sub(1) {
            Some(n) => {
                self.left.set(n);
                Ok(())
            }
            None => Err(E::custom(format!(
                "more than {MAX_VARIABLE_VALUES} values in the template variables"
            ))),
        }
    }

    fn inner(&self) -> Budget<'_> {
        Budget {
            left: self.left,
            depth: self.depth + 1,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Budget<'_> {
    type Value = Value;
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        if self.depth > MAX_VARIABLE_DEPTH {
            return Err(de::Error::custom(format!(
                "template variables nested more than {MAX_VARIABLE_DEPTH} deep"
            )));
        }
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Budget<'_> {
    type Value = Value;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Bool(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::from(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::from(v))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.spend()?;
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::String(v.to_string()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::String(v))
    }
    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.spend()?;
        Ok(Value::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.spend()?;
        let mut out = Vec::new();
        while let Some(v) = seq.next_element_seed(self.inner())? {
            out.push(v);
        }
        Ok(Value::Array(out))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Value, A::Error> {
        self.spend()?;
        let mut out = Map::new();
        while let Some(k) = m.next_key::<String>()? {
            self.spend()?;
            let v = m.next_value_seed(self.inner())?;
            out.insert(k, v);
        }
        Ok(Value::Object(out))
    }
}

/// The number of JSON values a document holds, roughly (opening brackets, commas and colons
/// outside strings: every element and every key costs one), counted without building anything.
/// Used to refuse a body before parsing it when it describes more than a bound.
pub fn count_values(bytes: &[u8]) -> usize {
    let mut n = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for &b in bytes {
        if in_str {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_str = false;
            }
        } else {
            match b {
                b'"' => in_str = true,
                b'[' | b'{' | b',' | b':' => n += 1,
                _ => {}
            }
        }
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize, Debug)]
    struct T {
        #[serde(default, deserialize_with = "list::<_, _, 3>")]
        l: Vec<String>,
        #[serde(default, deserialize_with = "map::<_, 2>")]
        m: BTreeMap<String, String>,
        #[serde(default, deserialize_with = "variables")]
        v: Option<Value>,
    }

    #[test]
    fn bounds_stop_deserializing() {
        let ok: T = serde_json::from_str(
            r#"{"l": ["a", "b", "c"], "m": {"x": "1"}, "v": {"a": [1, {"b": null}]}}"#,
        )
        .unwrap();
        assert_eq!(ok.l.len(), 3);
        assert_eq!(ok.m.len(), 1);
        assert_eq!(ok.v.unwrap()["a"][1]["b"], Value::Null);
        for (bad, want) in [
            (r#"{"l": ["a", "b", "c", "d"]}"#, "more than 3 items"),
            (
                r#"{"m": {"a": "", "b": "", "c": ""}}"#,
                "more than 2 entries",
            ),
            (
                &format!(r#"{{"v": [{}]}}"#, vec!["0"; MAX_VARIABLE_VALUES].join(",")),
                "more than 10000 values",
            ),
            (
                &format!(r#"{{"v": {}0{}}}"#, "[".repeat(40), "]".repeat(40)),
                "nested more than",
            ),
        ] {
            let e = serde_json::from_str::<T>(bad).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
        let none: T = serde_json::from_str(r#"{"v": null}"#).unwrap();
        assert!(none.v.is_none());
    }

    #[test]
    fn values_are_counted_outside_strings_only() {
        assert_eq!(count_values(br#"{"a": [1, 2], "b": "x,y:[{"}"#), 6);
        assert_eq!(count_values(br#"["\",", ","]"#), 2);
        assert_eq!(count_values(b"[[],[],[]]"), 6);
    }
}
