//! C2SP `tlog-tiles`: the tree served as immutable tiles of 256 hashes.
//!
//! A hash tile at level `L`, index `N`, width `W` holds the hashes of nodes `N*256 .. N*256+W`
//! at tree level `8*L` (so level 0 tiles hold leaf hashes); its path is `tile/<L>/<N>`, with
//! `.p/<W>` for a partial tile (`W < 256`). `N` is written in groups of three digits, all but
//! the last prefixed with `x` (`1234067` → `x001/x234/067`). Entry bundles
//! (`tile/entries/<N>[.p/<W>]`) hold the leaves' data, each as a big-endian `u16` length and
//! the bytes.
use crate::LogError;
use crate::merkle::{HASH_SIZE, Hash, stored_hash_index};

/// Hashes in a full tile.
pub const TILE_WIDTH: u64 = 256;
/// Tree levels per tile level.
pub const TILE_HEIGHT: u8 = 8;
/// Largest entry an entry bundle can hold.
pub const MAX_ENTRY_LEN: usize = u16::MAX as usize;

/// One tile's coordinates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TileId {
    /// Tile level (tree level `8 * level`).
    pub level: u8,
    /// Index within the level.
    pub index: u64,
    /// How many hashes (or entries): 1..=256.
    pub width: u16,
}

/// A parsed tile path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TilePath {
    /// `tile/<L>/<N>[.p/<W>]`
    Hashes(TileId),
    /// `tile/entries/<N>[.p/<W>]` (level 0)
    Entries(TileId),
}

fn encode_index(mut n: u64) -> String {
    let mut s = format!("{:03}", n % 1000);
    while n >= 1000 {
        n /= 1000;
        s = format!("x{:03}/{s}", n % 1000);
    }
    s
}

impl TileId {
    fn suffix(&self) -> String {
        let n = encode_index(self.index);
        if u64::from(self.width) == TILE_WIDTH {
            n
        } else {
            format!("{n}.p/{}", self.width)
        }
    }

    /// `tile/<L>/<N>[.p/<W>]`
    pub fn path(&self) -> String {
        format!("tile/{}/{}", self.level, self.suffix())
    }

    /// `tile/entries/<N>[.p/<W>]` (meaningful for level 0).
    pub fn entries_path(&self) -> String {
        format!("tile/entries/{}", self.suffix())
    }

    /// The first leaf (level 0) or node at tree level `8 * level` this tile covers.
    pub fn first(&self) -> u64 {
        self.index.saturating_mul(TILE_WIDTH)
    }

    /// The stored-hash indexes of this tile's hashes, in order: its content is those hashes
    /// concatenated.
    pub fn hash_indexes(&self) -> Vec<u64> {
        let level = self.level.saturating_mul(TILE_HEIGHT);
        (0..u64::from(self.width))
            .map(|i| stored_hash_index(level, self.first() + i))
            .collect()
    }

    /// Whether a tree of `size` leaves has every node this tile holds (tiles never change
    /// once complete, so any such tile may be served for that tree).
    pub fn within(&self, size: u64) -> bool {
        let shift = u32::from(self.level) * u32::from(TILE_HEIGHT);
        let nodes = size.checked_shr(shift).unwrap_or(0);
        self.first()
            .checked_add(u64::from(self.width))
            .is_some_and(|end| end <= nodes)
    }

    /// The leaf range `[start, end)` an entry bundle with these coordinates holds.
    pub fn leaf_range(&self) -> (u64, u64) {
        (self.first(), self.first() + u64::from(self.width))
    }
}

/// Every hash tile of a tree of `size` leaves (full tiles and the partial right edge of each
/// level), lowest level first. Level 0 coordinates are also those of the entry bundles.
pub fn tiles_for_size(size: u64) -> Vec<TileId> {
    let mut out = Vec::new();
    for level in 0..8u8 {
        let nodes = size
            .checked_shr(u32::from(level) * u32::from(TILE_HEIGHT))
            .unwrap_or(0);
        if nodes == 0 {
            break;
        }
        for index in 0..nodes / TILE_WIDTH {
            out.push(TileId {
                level,
                index,
                width: 256,
            });
        }
        let rest = nodes % TILE_WIDTH;
        if rest > 0 {
            out.push(TileId {
                level,
                index: nodes / TILE_WIDTH,
                width: u16::try_from(rest).unwrap_or(256),
            });
        }
    }
    out
}

/// Parses a tile path (without a leading `/`). Only the canonical spelling is accepted.
pub fn parse_tile_path(path: &str) -> Result<TilePath, LogError> {
    let bad = |why: &str| LogError::malformed("tile path", format!("{path:?}: {why}"));
    if path.len() > 64 {
        return Err(bad("too long"));
    }
    let rest = path.strip_prefix("tile/").ok_or_else(|| bad("not tile/"))?;
    let (kind, rest) = rest.split_once('/').ok_or_else(|| bad("no index"))?;
    let (digits, width) = match rest.split_once(".p/") {
        Some((d, w)) => {
            let w: u16 = w.parse().map_err(|_| bad("bad width"))?;
            if w == 0 || u64::from(w) >= TILE_WIDTH {
                return Err(bad("partial width must be 1..=255"));
            }
            (d, w)
        }
        None => (rest, 256),
    };
    let mut index = 0u64;
    for group in digits.split('/') {
        let g = group.trim_start_matches('x');
        if g.len() != 3 || !g.bytes().all(|b| b.is_ascii_digit()) {
            return Err(bad("bad index group"));
        }
        let v: u64 = g.parse().map_err(|_| bad("bad index group"))?;
        index = index
            .checked_mul(1000)
            .and_then(|i| i.checked_add(v))
            .ok_or_else(|| bad("index overflow"))?;
    }
    let tile = |level| TileId {
        level,
        index,
        width,
    };
    let parsed = if kind == "entries" {
        TilePath::Entries(tile(0))
    } else {
        let level: u8 = kind.parse().map_err(|_| bad("bad level"))?;
        if level >= 8 || kind != level.to_string() {
            return Err(bad("bad level"));
        }
        TilePath::Hashes(tile(level))
    };
    let canonical = match parsed {
        TilePath::Hashes(t) => t.path(),
        TilePath::Entries(t) => t.entries_path(),
    };
    if canonical != path {
        return Err(bad("not canonical"));
    }
    Ok(parsed)
}

/// Concatenates hashes into tile content.
pub fn encode_hash_tile(hashes: &[Hash]) -> Vec<u8> {
    hashes.iter().flat_map(|h| h.0).collect()
}

/// Splits tile content into hashes; `width` must match.
pub fn decode_hash_tile(data: &[u8], width: u16) -> Result<Vec<Hash>, LogError> {
    if data.len() != usize::from(width) * HASH_SIZE {
        return Err(LogError::malformed(
            "hash tile",
            format!("{} bytes for width {width}", data.len()),
        ));
    }
    Ok(data
        .chunks_exact(HASH_SIZE)
        .map(|c| {
            let mut h = [0u8; HASH_SIZE];
            h.copy_from_slice(c);
            Hash(h)
        })
        .collect())
}

/// An entry bundle: each entry as a big-endian `u16` length and its bytes.
pub fn encode_entry_bundle<E: AsRef<[u8]>>(entries: &[E]) -> Result<Vec<u8>, LogError> {
    let mut out = Vec::new();
    for e in entries {
        let e = e.as_ref();
        let len = u16::try_from(e.len())
            .map_err(|_| LogError::malformed("entry", format!("{} bytes > 65535", e.len())))?;
        out.extend_from_slice(&len.to_be_bytes());
        out.extend_from_slice(e);
    }
    Ok(out)
}

/// Splits an entry bundle into its entries.
pub fn decode_entry_bundle(mut data: &[u8]) -> Result<Vec<Vec<u8>>, LogError> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let (len, rest) = data
            .split_first_chunk::<2>()
            .ok_or_else(|| LogError::malformed("entry bundle", "truncated length"))?;
        let len = usize::from(u16::from_be_bytes(*len));
        if rest.len() < len {
            return Err(LogError::malformed(
                "entry bundle",
                format!("entry {} truncated", out.len()),
            ));
        }
        let (entry, rest) = rest.split_at(len);
        out.push(entry.to_vec());
        data = rest;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryTree;

    #[test]
    fn paths_follow_c2sp() {
        let t = TileId {
            level: 0,
            index: 1_234_067,
            width: 256,
        };
        assert_eq!(t.path(), "tile/0/x001/x234/067");
        assert_eq!(t.entries_path(), "tile/entries/x001/x234/067");
        let p = TileId {
            level: 1,
            index: 0,
            width: 7,
        };
        assert_eq!(p.path(), "tile/1/000.p/7");
        for s in [
            "tile/0/x001/x234/067",
            "tile/1/000.p/7",
            "tile/entries/x001/x234/067.p/255",
            "tile/entries/000",
        ] {
            let parsed = parse_tile_path(s).unwrap();
            let back = match parsed {
                TilePath::Hashes(t) => t.path(),
                TilePath::Entries(t) => t.entries_path(),
            };
            assert_eq!(back, s);
        }
        for bad in [
            "tile/0/1",
            "tile/0/0001",
            "tile/00/000",
            "tile/0/000.p/0",
            "tile/0/000.p/256",
            "tile/0/x000/001",
            "tile/0/001/002",
            "tile/x/000",
            "tile/8/000",
            "tiles/0/000",
            "tile/0/../000",
            "tile/0/000.p/07",
            "tile/0/x1000000000000000000/000",
        ] {
            assert!(parse_tile_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tiles_cover_a_tree_and_reproduce_it() {
        let mut tree = MemoryTree::new();
        for i in 0..70_000u32 {
            tree.push(&i.to_be_bytes());
        }
        let tiles = tiles_for_size(tree.size());
        // 70000 leaves: 273 full + 1 partial (112) at level 0; 273 nodes at level 1 (1 full +
        // 1 partial of 17); 1 node at level 2.
        assert_eq!(tiles.len(), 277);
        assert!(tiles.iter().all(|t| t.within(tree.size())));
        assert!(
            !tiles
                .iter()
                .any(|t| t.within(tree.size() - 1) && t.level == 0 && t.width == 112)
        );
        assert_eq!(
            tiles[tiles.len() - 2..],
            [
                TileId {
                    level: 1,
                    index: 1,
                    width: 17
                },
                TileId {
                    level: 2,
                    index: 0,
                    width: 1
                }
            ]
        );
        // A level-1 hash is the root of the level-0 tile below it.
        let l0 = tiles[0];
        let hashes: Vec<_> = l0
            .hash_indexes()
            .iter()
            .map(|&i| tree.stored_hash(i).unwrap())
            .collect();
        let data = encode_hash_tile(&hashes);
        assert_eq!(decode_hash_tile(&data, 256).unwrap(), hashes);
        let sub = tlog_tiles::Tile::subtree_hash(&data);
        let up = TileId {
            level: 1,
            index: 0,
            width: 1,
        };
        assert_eq!(tree.stored_hash(up.hash_indexes()[0]).unwrap(), sub);
        assert!(decode_hash_tile(&data[1..], 256).is_err());
    }

    #[test]
    fn entry_bundles_round_trip_and_refuse_truncation() {
        let entries = vec![b"".to_vec(), b"a".to_vec(), vec![7u8; 300]];
        let b = encode_entry_bundle(&entries).unwrap();
        assert_eq!(&b[..3], &[0, 0, 0]);
        assert_eq!(decode_entry_bundle(&b).unwrap(), entries);
        assert!(decode_entry_bundle(&b[..b.len() - 1]).is_err());
        assert!(decode_entry_bundle(&[0]).is_err());
        assert!(encode_entry_bundle(&[vec![0u8; 70_000]]).is_err());
    }
}
