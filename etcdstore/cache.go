package etcdstore

import (
	"context"
	"fmt"
	"os"
	"time"
)

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

// fetchCache tries the remote cache into the (empty) output directory.
//
// Like a builder, the fetch ends when the lease is in doubt, and then it
// touches the tree no more: after the lock delay it may be another host's.
// An error means the attempt must fail (lease lost, caller gone, or the
// leftovers of a failed fetch could not be cleared); a failed fetch
// itself is a miss.
func (s *Store) fetchCache(ctx context.Context, l *Lease, id string) (bool, error) {
	c := s.opt.cache
	if c == nil {
		return false, nil
	}
	fctx, stop := mergeCancel(ctx, l.ctx)
	defer stop()
	ok, err := c.Fetch(fctx, id, s.outputDir(id))
	if cause := stopCause(fctx, l); cause != nil {
		return false, fmt.Errorf("remote cache fetch stopped: %w", cause)
	}
	if err != nil || !ok {
		if err != nil {
			s.opt.logger.Warn("remote cache fetch failed; building instead", "id", id, "err", err)
		}
		s.emit(Event{Kind: EventCacheMiss, ID: id, Host: s.opt.host, PID: s.pid, Err: err})
		// Whatever a failed fetch left behind must not mix with the build.
		if err := s.moveToTrash(s.outputDir(id)); err != nil {
			return false, fmt.Errorf("clear the leftovers of a failed cache fetch: %w", err)
		}
		if err := os.Mkdir(s.outputDir(id), 0o755); err != nil {
			return false, err
		}
		return false, nil
	}
	s.emit(Event{Kind: EventCacheHit, ID: id, Host: s.opt.host, PID: s.pid})
	return true, nil
}

// storeCache uploads a freshly built package in the background, holding a
// reference while the tree is read so that no host removes it meanwhile.
// The reference is taken before Build returns: a CLI closes its store right
// after, and Close waits for the upload (bounded by the cache's own
// deadlines) rather than cutting it short. The event comes after the
// reference is released.
func (s *Store) storeCache(ctx context.Context, id string, pkg PackageRecord) {
	c := s.opt.cache
	if c == nil || pkg.FromCache {
		return
	}
	h := s.Handle(id)
	held := h.IncRefContext(context.WithoutCancel(ctx)) == nil
	if s.testHookUpload != nil {
		s.testHookUpload(id)
	}
	release := func() {
		if held {
			h.DecRefContext(context.Background()) //nolint:errcheck // retried in the background; Close revokes the lease anyway
		}
	}
	upload := func() {
		start := time.Now()
		err := c.Store(context.Background(), id, s.outputDir(id), pkg)
		elapsed := time.Since(start)
		release()
		if err != nil {
			s.opt.logger.Warn("remote cache upload failed", "id", id, "err", err)
			s.emit(Event{Kind: EventCacheUploadFailed, ID: id, Err: err})
			return
		}
		s.emit(Event{Kind: EventCacheStored, ID: id, Elapsed: elapsed, Size: pkg.Size, Digest: pkg.Digest})
	}
	if !s.spawn(upload) {
		release() // closing: no upload
	}
}
