package etcdstore

import (
	"errors"
	"fmt"

	"github.com/granary-build/granary/core"
)

// The store's sentinel errors (test with errors.Is) and its error types
// (errors.As). Errors that mean "the package is not there" wrap
// core.ErrPackageNotExist; a failed build wraps core.ErrBuildFailed.

var (
	// ErrClosed is returned by operations on a closed Store.
	ErrClosed = errors.New("etcdstore: store is closed")

	// ErrLeaseLost is the cause of a builder's context cancellation when the
	// store's lease is in doubt or gone, and is wrapped by the error of a
	// Build whose attempt it ended.
	ErrLeaseLost = errors.New("etcdstore: lease lost")

	// ErrFenced is wrapped by the error of a Build whose attempt lost the
	// build lock before it could publish. Its tree was left to the attempt
	// that took over.
	ErrFenced = errors.New("etcdstore: build lock lost before publishing")

	// ErrNoRef is returned by DecRef when this store holds no reference to
	// the package. It is core.ErrNoRef, the contract's sentinel.
	ErrNoRef = core.ErrNoRef

	// ErrForeignCluster is returned by New when the root is bound to another
	// etcd cluster or prefix.
	ErrForeignCluster = errors.New("etcdstore: root bound to another etcd cluster")

	// ErrCollectorBusy is returned by Prune when another collector is
	// sweeping.
	ErrCollectorBusy = errors.New("etcdstore: another collector is running")

	// ErrDigestMismatch is returned by Verify when a tree changed after it
	// was published.
	ErrDigestMismatch = errors.New("etcdstore: digest mismatch")

	// ErrAbandon, wrapped by a builder's error, gives the attempt up as if
	// every caller had cancelled: nothing is published, the partial tree
	// goes to the trash, and hosts waiting on the attempt try themselves
	// instead of failing with it. For builders that only look (a fetch
	// from the remote cache that missed), not for real build failures.
	ErrAbandon = errors.New("etcdstore: attempt abandoned")

	// ErrNotSharedRoot is returned by New when the root is empty, missing or
	// bound under another identity while the prefix already has a shared root:
	// most often, the shared volume is not mounted on this host.
	ErrNotSharedRoot = errors.New("etcdstore: not the shared root of this prefix")

	// ErrCompacted is returned by WatchCluster when the revision to start from
	// was compacted away: etcd no longer has that history.
	ErrCompacted = errors.New("etcdstore: revision compacted")

	// ErrFutureRevision is returned by WatchCluster for a start revision
	// etcd has not reached yet.
	ErrFutureRevision = errors.New("etcdstore: revision not reached yet")

	// ErrNotVisible is returned when etcd says a package is published but this
	// host cannot see its tree within the visibility timeout: its view of the
	// shared root is stale (a mount option), or the volume is not mounted.
	ErrNotVisible = errors.New("etcdstore: published package not visible on this host")
)

// BuildError is the error of a failed build attempt. It wraps
// core.ErrBuildFailed and the builder's own error (for callers on another
// host, an error carrying its message).
type BuildError struct {
	ID     string
	Host   string // host that ran the attempt
	PID    int
	LogDir string
	Err    error
}

func (e *BuildError) Error() string {
	return fmt.Sprintf("etcdstore: build %q failed on %s (pid %d; logs in %s): %v", e.ID, e.Host, e.PID, e.LogDir, e.Err)
}

// Unwrap returns core.ErrBuildFailed and the cause.
func (e *BuildError) Unwrap() []error { return []error{core.ErrBuildFailed, e.Err} }

// NeedError says which need of a build was not available.
type NeedError struct {
	Need string
	Err  error // wraps core.ErrPackageNotExist (and core.ErrInvalidated for an invalidated need)
}

func (e *NeedError) Error() string { return fmt.Sprintf("need %q: %v", e.Need, e.Err) }
func (e *NeedError) Unwrap() error { return e.Err }
