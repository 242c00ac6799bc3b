// Package cache is a remote cache of published packages for etcdstore: a
// Remote implements etcdstore.Cache over an HTTP file server that accepts
// PUT (nginx's WebDAV module), over S3 (s3://bucket/prefix) or over a
// directory (a second mount, a FUSE-mounted bucket). Open picks one by URL.
//
// Each package is two objects beside each other, so any plain file server
// will do:
//
//	<base>/<id>.tar.zst   the tree: a tar of directories, files and in-tree
//	                      symlinks, compressed with zstd (Pack, Unpack)
//	<base>/<id>.json      its Index: id, digest, sizes, format version
//
// The archive is written first and the index last, so a reader never finds
// an index without its archive. Fetch unpacks into the package's empty
// output directory, refusing anything unsafe (paths out of the tree,
// symlinks leading out or written through, devices, hard links, duplicates,
// more than the Limits), and then checks the tree against the index's
// digest with etcdstore.TreeDigest. A miss is never remembered.
//
// Entries can be signed (WithSignKey) with ed25519 keys in Nix's NAME:BASE64
// text format (GenerateKey, ParseSecretKey, ParsePublicKeys); with trusted
// keys (WithTrustedKeys) Fetch refuses, as a *RejectedError, any entry
// that no trusted key signed or whose archive is not the signed one, before
// unpacking anything. Each Fetch is bounded by a total budget
// (WithFetchBudget), so a stalled cache holds the build lock for at most
// that long. NewS3 stores entries in S3 or an S3-compatible server.
//
// Who owns what: etcdstore calls Fetch under the package's build lock, into
// a directory it clears if Fetch fails, and calls Store in the background
// after publishing; a Remote holds no state besides its counters (Stats)
// and idle HTTP connections. The design and the measured throughput are in
// docs/cache.md.
package cache
