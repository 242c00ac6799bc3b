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

// awaitVisible returns once this host can see the tree that rec describes:
// pkgs/<id>/contents exists and, when the record carries it, has the
// recorded number of top-level entries. It revalidates first (opening a
// directory makes an NFS client check it with the server, dropping cached
// entries, negative ones included, if it changed), and retries with
// back-off until the visibility timeout (awaitSeen), emitting
// EventWaitVisible once and logging what it waits for. It then fails with
// ErrNotVisible, naming the mount options that cause it. On a coherent file
// system the first look succeeds: two directory opens, a stat and, with an
// entry count, one listing.
func (s *Store) awaitVisible(ctx context.Context, id string, rec *PackageRecord) error {
	if rec != nil && s.visible.seen(id, rec.Attempt) {
		return nil
	}
	why := s.visibleNow(id, rec)
	if why == nil {
		s.visible.add(id, rec)
		return nil
	}
	why, err := s.awaitSeen(ctx, why, sight{
		waiting: "waiting for a published package to become visible on this host",
		seen:    "published package visible",
		attrs:   []any{"id", id},
		look:    func() error { return s.visibleNow(id, rec) },
		started: func(why error, timeout time.Duration) {
			s.emit(Event{Kind: EventWaitVisible, ID: id, Host: rec.BuiltBy, PID: rec.PID, Since: rec.BuiltAt, Elapsed: timeout, Err: why})
		},
	})
	switch {
	case err != nil:
		return fmt.Errorf("waiting for %q to become visible (%v): %w", id, why, err)
	case why != nil:
		return fmt.Errorf("%w: %q was published by %s at %s, but after %v here %v. %s",
			ErrNotVisible, id, rec.BuiltBy, rec.BuiltAt.Format(time.RFC3339), s.visibleWait(), why, staleViewHint)
	}
	s.visible.add(id, rec)
	return nil
}

// staleViewHint says what makes a host's view of the shared root stale and
// what to change; it ends the errors of a wait that timed out.
const staleViewHint = "This host's view of the shared root is stale (or the volume is not mounted): on NFS, mount with lookupcache=positive (or none) " +
	"and a short actimeo/acdirmax, and keep close-to-open (no nocto); on sshfs/FUSE, dir_cache=no and short entry_timeout/negative_timeout. " +
	"See \"Running on NFS\" in the README"

// visibleWait is the visibility timeout: how long a host waits to see on
// the shared root what etcd says is there.
func (s *Store) visibleWait() time.Duration {
	if s.opt.visibleTimeout <= 0 {
		return DefaultVisibleTimeout
	}
	return s.opt.visibleTimeout
}

// sight is something etcd says is on the shared root, for awaitSeen.
type sight struct {
	waiting string // logged when the wait starts: what it waits for
	seen    string // logged when a later look succeeds
	attrs   []any  // logged with both
	// look revalidates what it checks (opens the parents) and looks once:
	// nil when this host sees it, else what is missing.
	look func() error
	// started, if set, is called once when the wait starts, with the first
	// look's answer and the timeout (to send an event).
	started func(why error, timeout time.Duration)
}

// awaitSeen waits until this host sees what etcd says is on the shared
// root, never deciding on one look at its cached view: the caller's first
// look failed with why, so it logs what it waits for, calls started, and
// looks again with back-off (50 ms, doubling up to 2 s) until a look
// succeeds or the visibility timeout passes. It returns (nil, nil) once
// seen; the last look's answer and ctx's error if ctx ends; the last look's
// answer and nil when the timeout passed, for the caller to say what that
// means. It blocks for at most the visibility timeout.
func (s *Store) awaitSeen(ctx context.Context, why error, w sight) (last, err error) {
	timeout := s.visibleWait()
	attrs := w.attrs[:len(w.attrs):len(w.attrs)] // appended to twice
	start := time.Now()
	s.opt.logger.Info(w.waiting, append(attrs, "why", why, "up_to", timeout)...)
	if w.started != nil {
		w.started(why, timeout)
	}
	wait := 50 * time.Millisecond
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return why, ctx.Err()
		case <-t.C:
		}
		if why = w.look(); why == nil {
			s.opt.logger.Info(w.seen, append(attrs, "waited", time.Since(start).Round(time.Millisecond))...)
			return nil, nil
		}
		left := timeout - time.Since(start)
		if left <= 0 {
			return why, nil
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
	ch := s.cli.Watch(wctx, s.keys.AvailKey(id), clientv3.WithCreatedNotify())
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

// recordMemo remembers the published record of each package by the mod
// revision of its avail key, which names one record for good: IncRef, which
// reads the record back in its Txn, decodes it once per publish instead of
// once per call (the decode was an eighth of IncRef's client CPU).
type recordMemo struct {
	mu sync.Mutex
	m  map[string]memoRecord
}

type memoRecord struct {
	rev int64
	rec *PackageRecord // shared: read only
}

// known returns the record of id the memo holds, if any (rec is nil if not).
func (v *recordMemo) known(id string) memoRecord {
	v.mu.Lock()
	defer v.mu.Unlock()
	return v.m[id]
}

// decode returns the record of id published at rev from b, decoding it
// only if the memo does not hold it.
func (v *recordMemo) decode(id string, rev int64, b []byte) *PackageRecord {
	v.mu.Lock()
	got, ok := v.m[id]
	v.mu.Unlock()
	if ok && got.rev == rev {
		return got.rec
	}
	rec, err := decode[PackageRecord](b)
	if err != nil {
		return nil
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	if v.m == nil || len(v.m) >= memoMax {
		v.m = make(map[string]memoRecord)
	}
	v.m[id] = memoRecord{rev: rev, rec: rec}
	return rec
}
