//! Which source streams an output keeps, and what the status says about each of them: every audio and
//! subtitle track of the source either appears in an output or is listed as left out, with the reason.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Which source audio and subtitle tracks the outputs keep. Absent: every track that fits the output.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StreamsSpec {
    /// Audio tracks to keep (default: all).
    #[serde(default, skip_serializing_if = "TrackSelection::is_all")]
    pub audio: TrackSelection,
    /// Text subtitle tracks to keep (default: all).
    #[serde(default, skip_serializing_if = "TrackSelection::is_all")]
    pub subtitles: TrackSelection,
}

/// A choice of tracks of one kind: all of them (nothing set), none, or those matching any of the listed
/// languages or source stream indices.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(extend("x-kubernetes-validations" = [
    {
        "rule": "!has(self.none) || !self.none || ((!has(self.languages) || size(self.languages) == 0) && (!has(self.indices) || size(self.indices) == 0))",
        "message": "none excludes languages and indices: give either none: true or the tracks to keep"
    }
]))]
pub struct TrackSelection {
    /// Keep no track of this kind.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub none: bool,
    /// Keep the tracks in these languages: ISO 639 codes in any form (`fr`, `fra`, `fre`); a region
    /// (`en-US`) is ignored when matching.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub languages: Vec<String>,
    /// Keep the tracks at these source stream indices (as `tessera probe` lists them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64))]
    pub indices: Vec<u32>,
}

impl TrackSelection {
    pub fn is_all(&self) -> bool {
        !self.none && self.languages.is_empty() && self.indices.is_empty()
    }

    /// Whether a track at source `index` in `language` (its tag as the source has it) is kept.
    pub fn keeps(&self, index: usize, language: Option<&str>) -> bool {
        if self.none {
            return false;
        }
        if self.is_all() {
            return true;
        }
        self.indices.iter().any(|&i| i as usize == index)
            || language.is_some_and(|l| self.languages.iter().any(|w| same_language(w, l)))
    }

    /// How the selection reads in a left-out reason.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if !self.languages.is_empty() {
            parts.push(format!("languages {}", self.languages.join(", ")));
        }
        if !self.indices.is_empty() {
            let ix: Vec<String> = self.indices.iter().map(u32::to_string).collect();
            parts.push(format!("indices {}", ix.join(", ")));
        }
        if self.none {
            parts.push("none".into());
        }
        parts.join("; ")
    }
}

/// What an output carries, one entry per stream.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutputStream {
    /// `video`, `audio` or `subtitle`.
    pub kind: String,
    /// The output codec (`h264`, `aac`, `mov_text`, `webvtt`...).
    pub codec: String,
    /// The source stream it was made from.
    pub source_index: u32,
    /// ISO 639-2 language from the source (absent: undetermined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// The stream's title from the source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Selected by players when the user chose nothing.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub default: bool,
    /// Shown even when subtitles are off (forced narrative).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forced: bool,
    /// Audio channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<u32>,
}

/// A source stream that is not in an output, and why.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LeftOutStream {
    /// The index of the stream in the source.
    pub source_index: u32,
    /// `video`, `audio`, `subtitle`, `data` or `attachment`.
    pub kind: String,
    /// The source codec.
    pub codec: String,
    /// ISO 639-2 language from the source (absent: undetermined).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Why it is not in the output, e.g. a bitmap subtitle in a text-only container, or not selected.
    pub reason: String,
}

/// ISO 639-2 bibliographic codes and their terminology (ISO 639-3) equivalents.
const BIBLIOGRAPHIC: [(&str, &str); 20] = [
    ("alb", "sqi"),
    ("arm", "hye"),
    ("baq", "eus"),
    ("bur", "mya"),
    ("chi", "zho"),
    ("cze", "ces"),
    ("dut", "nld"),
    ("fre", "fra"),
    ("geo", "kat"),
    ("ger", "deu"),
    ("gre", "ell"),
    ("ice", "isl"),
    ("mac", "mkd"),
    ("mao", "mri"),
    ("may", "msa"),
    ("per", "fas"),
    ("rum", "ron"),
    ("slo", "slk"),
    ("tib", "bod"),
    ("wel", "cym"),
];

/// The language an ISO 639 code names (639-1, 639-2/B, 639-2/T or 639-3, any case; a BCP 47 region or
/// script after `-` or `_` is ignored). `None` for `und`, empty and unknown codes.
pub fn language(code: &str) -> Option<isolang::Language> {
    let primary = code
        .split(['-', '_'])
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match primary.len() {
        2 => isolang::Language::from_639_1(&primary),
        3 => {
            let t = BIBLIOGRAPHIC
                .iter()
                .find(|(b, _)| *b == primary)
                .map_or(primary.as_str(), |(_, t)| t);
            isolang::Language::from_639_3(t).filter(|l| l.to_639_3() != "und")
        }
        _ => None,
    }
}

/// Whether two codes name the same language (`fr`, `fra` and `fre` do); unknown codes compare as text.
pub fn same_language(a: &str, b: &str) -> bool {
    match (language(a), language(b)) {
        (Some(x), Some(y)) => x == y,
        _ => a.eq_ignore_ascii_case(b),
    }
}

/// The language tag HLS and DASH manifests carry (BCP 47 / RFC 5646): the two-letter code where the
/// language has one, else its three-letter code. `None` for undetermined.
pub fn bcp47(code: &str) -> Option<String> {
    let l = language(code)?;
    Some(l.to_639_1().unwrap_or(l.to_639_3()).to_string())
}

/// The three-letter code MP4's language field carries (ISO 639-2/T).
pub fn iso639_2(code: &str) -> Option<String> {
    language(code).map(|l| l.to_639_3().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_of_a_language_code_matches() {
        for (a, b) in [
            ("fr", "fra"),
            ("fre", "fra"),
            ("FR", "fre"),
            ("en-US", "eng"),
            ("de", "ger"),
        ] {
            assert!(same_language(a, b), "{a} vs {b}");
        }
        assert!(!same_language("en", "fra"));
        assert!(!same_language("und", "eng"));
        assert_eq!(bcp47("fre").as_deref(), Some("fr"));
        assert_eq!(bcp47("eng").as_deref(), Some("en"));
        // No two-letter code: the three-letter one.
        assert_eq!(bcp47("haw").as_deref(), Some("haw"));
        assert_eq!(bcp47("und"), None);
        assert_eq!(bcp47(""), None);
        assert_eq!(iso639_2("fr").as_deref(), Some("fra"));
    }

    #[test]
    fn selections_keep_what_they_name() {
        let all = TrackSelection::default();
        assert!(all.keeps(3, None));
        let none = TrackSelection {
            none: true,
            ..Default::default()
        };
        assert!(!none.keeps(1, Some("eng")));
        let some = TrackSelection {
            languages: vec!["fr".into()],
            indices: vec![4],
            ..Default::default()
        };
        assert!(some.keeps(1, Some("fre")));
        assert!(some.keeps(4, Some("deu")));
        assert!(!some.keeps(2, Some("eng")));
        assert!(!some.keeps(2, None));
        assert_eq!(some.describe(), "languages fr; indices 4");
    }
}
