//! Friendly display names ("Amber Otter") so people can tell peers apart in a room.

use rand::Rng;

const ADJECTIVES: &[&str] = &[
    "Amber", "Azure", "Brave", "Calm", "Clever", "Coral", "Crimson", "Gentle", "Golden", "Jade",
    "Lively", "Lucky", "Misty", "Quiet", "Rapid", "Silver", "Sunny", "Swift", "Teal", "Violet",
];

const ANIMALS: &[&str] = &[
    "Badger", "Crane", "Dolphin", "Falcon", "Fox", "Gecko", "Heron", "Ibex", "Koala", "Lynx",
    "Marten", "Newt", "Otter", "Owl", "Panda", "Quail", "Robin", "Seal", "Tern", "Wolf",
];

/// A random "Adjective Animal" name.
pub fn friendly_name(rng: &mut impl Rng) -> String {
    let a = ADJECTIVES[rng.random_range(0..ADJECTIVES.len())];
    let b = ANIMALS[rng.random_range(0..ANIMALS.len())];
    format!("{a} {b}")
}
