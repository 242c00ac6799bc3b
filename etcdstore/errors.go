package etcdstore

import (
	"errors"
	"fmt"
	"runtime/debug"
	"time"

	"github.com/granary-build/granary/core"
)

// The store's sentinel errors (test with errors.Is) and its error types
// (errors.As). Errors that mean "the package is not there" wrap
// core.ErrPackageNotExist; a failed build wraps core.ErrBuildFailed.
// Messages read as core/errors.go says: no package prefix, and the
// operation named once, with the package, by the method that performs it
// (Handle.fail); a *BuildError names the build itself.

var (
	// ErrClosed is returned by operations on a closed Store.
	ErrClosed = errors.New("store is closed")

	// ErrLeaseLost is the cause of a builder's context cancellation when the
	// store's lease is in doubt or gone, and is wrapped by the error of a
	// Build whose attempt it ended.
	ErrLeaseLost = errors.New("lease lost")

	// ErrFenced is wrapped by the error of a Build whose attempt lost the
	// build lock before it could publish. Its tree was left to the attempt
	// that took over.
	ErrFenced = errors.New("build lock lost before publishing")

	// ErrNoRef is returned by DecRef when this store holds no reference to
	// the package. It is core.ErrNoRef, the contract's sentinel.
	ErrNoRef = core.ErrNoRef

	// ErrForeignCluster is returned by New when the root is bound to another
	// etcd cluster or prefix.
	ErrForeignCluster = errors.New("root bound to another etcd cluster")

	// ErrCollectorBusy is returned by Prune when another collector is
	// sweeping.
	ErrCollectorBusy = errors.New("another collector is running")

	// ErrDigestMismatch is returned by Verify when a tree changed after it
	// was published.
	ErrDigestMismatch = errors.New("digest mismatch")

	// ErrAbandon, wrapped by a builder's error, gives the attempt up as if
	// every caller had cancelled: nothing is published, the partial tree
	// goes to the trash, and hosts waiting on the attempt try themselves
	// instead of failing with it. For builders that only look (a fetch
	// from the remote cache that missed), not for real build failures.
	ErrAbandon = errors.New("attempt abandoned")

	// ErrNotSharedRoot is returned by New when the root is empty, missing or
	// bound under another identity while the prefix already has a shared root:
	// most often, the shared volume is not mounted on this host.
	ErrNotSharedRoot = errors.New("not the shared root of this prefix")

	// ErrCompacted is returned by WatchCluster when the revision to start from
	// was compacted away: etcd no longer has that history.
	ErrCompacted = errors.New("revision compacted")

	// ErrFutureRevision is returned by WatchCluster for a start revision
	// etcd has not reached yet.
	ErrFutureRevision = errors.New("revision not reached yet")

	// ErrNotVisible is returned when etcd says a package is published but this
	// host cannot see its tree within the visibility timeout: its view of the
	// shared root is stale (a mount option), or the volume is not mounted.
	ErrNotVisible = errors.New("published package not visible on this host")
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
	return fmt.Sprintf("build %q failed on %s (pid %d; logs in %s): %v", e.ID, e.Host, e.PID, e.LogDir, e.Err)
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

// NotSharedRootError is the ErrNotSharedRoot that New returns: what is
// wrong with Root, and which root etcd knows for the prefix.
type NotSharedRootError struct {
	Root    string        // the root New was given
	What    string        // what is wrong with it ("… does not exist")
	Cluster string        // etcd's cluster ID, hexadecimal
	Prefix  string        // the key prefix
	Shared  RootRecord    // the prefix's shared root, as etcd records it
	Waited  time.Duration // how long New looked again for the root (0: not at all)
}

func (e *NotSharedRootError) Error() string {
	msg := fmt.Sprintf("%v: %s; the shared root of etcd cluster %s prefix %q has root ID %s (bound by %s at %s as %s), "+
		"so this root is not the shared root of cluster %s prefix %q: is the shared volume mounted? "+
		"To make this the prefix's new shared root instead, initialise it explicitly (granary init-root, or WithInitRoot)",
		ErrNotSharedRoot, e.What, e.Cluster, e.Prefix, e.Shared.RootID, e.Shared.Host,
		e.Shared.BoundAt.Format(time.RFC3339), e.Shared.Path, e.Cluster, e.Prefix)
	if e.Waited > 0 {
		msg = fmt.Sprintf("%s. This host looked for it again for %v. %s", msg, e.Waited, staleViewHint)
	}
	return msg
}

// Unwrap returns ErrNotSharedRoot.
func (e *NotSharedRootError) Unwrap() error { return ErrNotSharedRoot }

// PanicError is the error of a builder that panicked. Its message is one
// line; the goroutine stack is kept in Stack for the log (the store logs it
// at error level, with the package ID) rather than in every message that
// quotes the error.
type PanicError struct {
	Value any    // what the builder panicked with
	Stack []byte // the panicking goroutine's stack
}

func (e *PanicError) Error() string { return fmt.Sprintf("builder panicked: %v", e.Value) }

// Unwrap returns the panic value when it is an error, so errors.Is finds
// what the builder panicked with.
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}

// recovered turns a recovered panic value into a *PanicError carrying the
// current stack (call it from the deferred function that recovered).
func recovered(r any) *PanicError {
	return &PanicError{Value: r, Stack: debug.Stack()}
}
