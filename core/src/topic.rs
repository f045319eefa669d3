//! APNs topic names: an app's bundle id plus the suffixes that select one of its special channels.
//!
//! A device registers its app's topic (the bundle id) once and gets one token for it; the provider then
//! pushes to that token with the bundle id or with the bundle id and a channel suffix (`.voip`,
//! `.complication`, …), as with APNs. Everything that binds a token or a registration to a topic uses
//! `app_topic`, so the channels share the app's token, its registration and its provider authorization.

/// Channel suffixes and the `apns-push-type` each requires, longest first so that
/// `.push-type.liveactivity` is not mistaken for something shorter.
pub const CHANNEL_SUFFIXES: &[(&str, &str)] = &[
    (".pushkit.fileprovider", "fileprovider"),
    (".push-type.liveactivity", "liveactivity"),
    (".push-type.widgets", "widgets"),
    (".push-type.controls", "controls"),
    (".location-query", "location"),
    (".complication", "complication"),
    (".voip-ptt", "pushtotalk"),
    (".voip", "voip"),
];

/// Longest topic, in bytes: APNs bundle ids with a channel suffix stay well inside it.
pub const MAX_TOPIC_LEN: usize = 255;

/// 1–255 printable ASCII characters, no spaces: what a bundle id plus a channel suffix can be. Devices'
/// registrations and providers' `apns-topic` are both checked by this.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && topic.len() <= MAX_TOPIC_LEN && topic.bytes().all(|b| b.is_ascii_graphic())
}

/// The channel suffix of `topic` and the push type it requires, if it has one.
pub fn channel(topic: &str) -> Option<(&'static str, &'static str)> {
    CHANNEL_SUFFIXES.iter().copied().find(|(suffix, _)| topic.len() > suffix.len() && topic.ends_with(suffix))
}

/// The app's topic (its bundle id): `topic` without its channel suffix.
pub fn app_topic(topic: &str) -> &str {
    match channel(topic) {
        Some((suffix, _)) => &topic[..topic.len() - suffix.len()],
        None => topic,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_are_checked() {
        assert!(valid_topic("com.example.app"));
        assert!(valid_topic("com.example.app.voip"));
        assert!(valid_topic(&"a".repeat(MAX_TOPIC_LEN)));
        assert!(!valid_topic(""));
        assert!(!valid_topic("has space"));
        assert!(!valid_topic("naïve"));
        assert!(!valid_topic(&"a".repeat(MAX_TOPIC_LEN + 1)));
    }

    #[test]
    fn suffixes_are_stripped_to_the_app_topic() {
        assert_eq!(app_topic("com.example.app"), "com.example.app");
        assert_eq!(app_topic("com.example.app.voip"), "com.example.app");
        assert_eq!(app_topic("com.example.app.voip-ptt"), "com.example.app");
        assert_eq!(app_topic("com.example.app.complication"), "com.example.app");
        assert_eq!(app_topic("com.example.app.pushkit.fileprovider"), "com.example.app");
        assert_eq!(app_topic("com.example.app.push-type.liveactivity"), "com.example.app");
        assert_eq!(channel("com.example.app.voip"), Some((".voip", "voip")));
        assert_eq!(channel("com.example.app"), None);
        // A bare suffix is a topic of its own, not an empty app topic.
        assert_eq!(app_topic(".voip"), ".voip");
    }
}
