package etcdstore

import "context"

// Cache is a remote cache of published packages. Build consults it under
// the package's build lock, before running the builder, and fills it in the
// background after publishing. Implementations must be safe for concurrent
// use.
type Cache interface {
	// Fetch fills dir, an existing empty directory, with the package's tree
	// if the cache has it, and reports whether it did. A miss is (false,
	// nil). On error Build clears dir and runs the builder. Fetch must
	// verify what it downloads and must not write outside dir.
	Fetch(ctx context.Context, id, dir string) (ok bool, err error)

	// Store uploads the published, read-only tree at dir. rec describes it
	// (size, digest). Errors are logged and reported as
	// EventCacheUploadFailed; they never fail the build.
	Store(ctx context.Context, id, dir string, rec PackageRecord) error
}
