package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// DefaultVisibleTimeout is how long a host waits, by default, to see a tree
// that etcd says is published: NFS's default acdirmax (60 s), the longest a
// client trusts a cached directory, so also a negative lookup, under
// lookupcache=all.
const DefaultVisibleTimeout = 60 * time.Second

// WithVisibleTimeout sets how long a host waits to see on the shared root a
// package that etcd says is published before it gives up with
// ErrNotVisible (default DefaultVisibleTimeout).
func WithVisibleTimeout(d time.Duration) Option { return func(o *options) { o.visibleTimeout = d } }

// ErrNotVisible is returned when etcd says a package is published but this
// host cannot see its tree within the visibility timeout: its view of the
// shared root is stale (a mount option), or the volume is not mounted.
var ErrNotVisible = errors.New("etcdstore: published package not visible on this host")

// awaitVisible returns once this host can see the tree that rec describes:
// pkgs/<id>/contents exists and, when the record carries it, has the
// recorded number of top-level entries. It revalidates first (opening a
// directory makes an NFS client check it with the server, dropping cached
// entries, negative ones included, if it changed), and retries with
// back-off until the visibility timeout, emitting EventWaitVisible once and
// logging what it waits for. It then fails with ErrNotVisible, naming the
// mount options that cause it. On a coherent file system the first look
// succeeds: two directory opens, a stat and, with an entry count, one
// listing.
func (s *Store) awaitVisible(ctx context.Context, id string, rec *PackageRecord) error {
	if rec != nil && s.visible.seen(id, rec.Attempt) {
		return nil
	}
	why := s.visibleNow(id, rec)
	if why == nil {
		s.visible.add(id, rec)
		return nil
	}
	timeout := s.opt.visibleTimeout
	if timeout <= 0 {
		timeout = DefaultVisibleTimeout
	}
	start := time.Now()
	s.opt.logger.Info("waiting for a published package to become visible on this host", "id", id, "why", why, "up_to", timeout)
	s.emit(Event{Kind: EventWaitVisible, ID: id, Host: rec.BuiltBy, PID: rec.PID, Since: rec.BuiltAt, Elapsed: timeout, Err: why})
	wait := 50 * time.Millisecond
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return fmt.Errorf("etcdstore: waiting for %q to become visible (%v): %w", id, why, ctx.Err())
		case <-t.C:
		}
		if why = s.visibleNow(id, rec); why == nil {
			s.visible.add(id, rec)
			s.opt.logger.Info("published package visible", "id", id, "waited", time.Since(start).Round(time.Millisecond))
			return nil
		}
		left := timeout - time.Since(start)
		if left <= 0 {
			return fmt.Errorf("%w: %q was published by %s at %s, but after %v here %v. This host's view of the shared root is stale "+
				"(or the volume is not mounted): on NFS, mount with lookupcache=positive (or none) and a short actimeo/acdirmax, and keep close-to-open "+
				"(no nocto); on sshfs/FUSE, dir_cache=no and short entry_timeout/negative_timeout. See \"Running on NFS\" in the README",
				ErrNotVisible, id, rec.BuiltBy, rec.BuiltAt.Format(time.RFC3339), timeout, why)
		}
		wait = min(2*wait, 2*time.Second, left)
		t.Reset(wait)
	}
}

// visibleNow looks once, after revalidating the parents, and says what is
// missing, or nil. It uses bare system calls: it is on the fast path of
// every IncRef, so it costs a few microseconds on a local disk.
func (s *Store) visibleNow(id string, rec *PackageRecord) error {
	n, err := lookTree(s.pkgsDir(), id, rec != nil && rec.Entries > 0)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return fmt.Errorf("%s does not exist", s.outputDir(id))
	case errors.Is(err, syscall.ENOTDIR):
		return fmt.Errorf("%s is not a directory", s.outputDir(id))
	case err != nil:
		return err
	case rec == nil || rec.Entries == 0:
		return nil // a record from before entry counts, or an empty tree
	case n != rec.Entries:
		return fmt.Errorf("%s lists %d top-level entries, the published tree has %d", s.outputDir(id), n, rec.Entries)
	}
	return nil
}

// topEntries counts the entries of dir, without the files an NFS or FUSE
// client leaves for open files that were deleted (.nfs*, .fuse_hidden*).
// Reading the listing goes to the server on NFS when the directory changed.
// The publisher records this count (PackageRecord.Entries) so that another
// host can tell a complete listing from a stale one.
func topEntries(dir string) (int, error) { return countEntries(dir, true) }

// silly reports whether name is a file an NFS client (.nfsXXXX, "silly
// rename") or FUSE (.fuse_hiddenXXXX) made for a deleted file that is still
// open: it goes on its own when the file is closed.
func silly(name string) bool {
	return strings.HasPrefix(name, ".nfs") || strings.HasPrefix(name, ".fuse_hidden")
}

// revalidateTree opens the given directories and every directory under the
// last one, so that an NFS client checks each with the server before a
// walk trusts it.
func revalidateTree(parents ...string) {
	revalidate(parents...)
	if len(parents) == 0 {
		return
	}
	filepath.WalkDir(parents[len(parents)-1], func(p string, d fs.DirEntry, err error) error { //nolint:errcheck // errors show in the walk that follows
		if err == nil && d.IsDir() {
			revalidate(p)
		}
		return nil
	})
}

// visibleMemo remembers, per package, the published attempt this store has
// seen on the shared root. Once a host has seen the tree of an attempt, its
// view of that tree cannot go back (it stays until the package is removed,
// and a rebuild is another attempt), so the next look is skipped: the hot
// path of a long-lived process costs a map lookup. It is cleared when it
// grows past memoMax entries.
type visibleMemo struct {
	mu sync.Mutex
	m  map[string]int64
}

const memoMax = 10000

func (v *visibleMemo) seen(id string, attempt int64) bool {
	if attempt == 0 {
		return false // a record without an attempt cannot be told apart
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	got, ok := v.m[id]
	return ok && got == attempt
}

func (v *visibleMemo) add(id string, rec *PackageRecord) {
	if rec == nil || rec.Attempt == 0 {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.m == nil || len(v.m) >= memoMax {
		v.m = make(map[string]int64)
	}
	v.m[id] = rec.Attempt
}

// errUnpublished ends a visibility wait whose package was removed or
// replaced meanwhile.
var errUnpublished = errors.New("removed or replaced meanwhile")

// awaitVisibleWhilePublished is awaitVisible for a caller that holds no
// reference (Build): if the package is removed or replaced meanwhile, the
// wait ends without an error. Build made it available; a user of the tree
// takes a reference, and IncRef checks again. The watch that notices the
// removal starts only when the first look fails.
func (s *Store) awaitVisibleWhilePublished(ctx context.Context, id string, rec *PackageRecord) error {
	if rec == nil || s.visible.seen(id, rec.Attempt) {
		return nil
	}
	if s.visibleNow(id, rec) == nil {
		s.visible.add(id, rec)
		return nil
	}
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.watchUnpublished(wctx, id, rec.Attempt, cancel)
	}()
	err := s.awaitVisible(wctx, id, rec)
	gone := errors.Is(context.Cause(wctx), errUnpublished)
	cancel(nil)
	<-done
	if gone {
		return nil
	}
	return err
}

// watchUnpublished calls stop(errUnpublished) when the package is no
// longer the one published by attempt, and returns when ctx ends.
func (s *Store) watchUnpublished(ctx context.Context, id string, attempt int64, stop context.CancelCauseFunc) {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	ch := s.cli.Watch(wctx, s.availKey(id), clientv3.WithCreatedNotify())
	for wr := range ch {
		if wr.Created {
			// Whatever happened before the watch: read it.
			if st, err := s.readState(ctx, id); err == nil && (st.avail == nil || st.avail.Attempt != attempt) {
				stop(errUnpublished)
				return
			}
			continue
		}
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypeDelete {
				stop(errUnpublished)
				return
			}
			if p, err := decode[PackageRecord](ev.Kv.Value); err == nil && p.Attempt != attempt {
				stop(errUnpublished)
				return
			}
		}
	}
}
