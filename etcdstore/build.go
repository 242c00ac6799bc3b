package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// Build is BuildContext with a background context, for the cipkg contract.
func (h *Handle) Build(builder func() error) error {
	return h.BuildContext(context.Background(), func(context.Context) error { return builder() })
}

// flight is one build attempt shared by the goroutines of this store that
// ask for the same package at the same time.
type flight struct {
	done    chan struct{}
	once    sync.Once
	err     error // set before done is closed
	ctx     context.Context
	cancel  context.CancelFunc
	callers int // guarded by Store.mu; the attempt is cancelled when it drops to 0
}

// BuildContext makes the package available, running builder at most once
// across every store that shares the root and the etcd cluster:
//
//  1. Fast path: if the package is published, return nil (one read).
//  2. Goroutines of this store share one attempt per package.
//  3. The attempt watches the package's keys and, at the same time, queues
//     for its lock. A publish by another host ends the wait at once; a
//     failure of the attempt we waited on returns an error wrapping
//     core.ErrBuildFailed; a crashed builder's lease expiry hands us the lock.
//  4. Holding the lock: re-check, consult the remote cache, record the
//     attempt on our lease (fenced by lock ownership).
//  5. Leftovers of a dead attempt are moved to the trash after the lock
//     delay; the builder runs with a context that ends when ctx ends, when
//     every caller gave up, or when our lease is in doubt. A panic becomes
//     an error.
//  6. Success: the tree is made read-only, its size and digest recorded, the
//     file system flushed, and the package published in one Txn that holds
//     only while we still own the lock.
//  7. Failure: the partial tree goes to the trash, logs stay, the lock is
//     released, and the error (a *BuildError wrapping the builder's) goes to
//     every caller of this attempt and to the waiters on other hosts.
//
// BuildContext blocks until one of these ends or ctx is done.
func (h *Handle) BuildContext(ctx context.Context, builder func(ctx context.Context) error) error {
	if h.err != nil {
		return h.fail("build", h.err)
	}
	s := h.s
	st, err := s.readState(ctx, h.id)
	if err != nil {
		return h.fail("build", err)
	}
	if st.avail != nil {
		return nil
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return h.fail("build", ErrClosed)
	}
	f := s.flights[h.id]
	if f == nil {
		f = &flight{done: make(chan struct{})}
		f.ctx, f.cancel = context.WithCancel(s.ctx)
		s.flights[h.id] = f
		s.wg.Add(1)
		go s.fly(f, h.id, builder)
	}
	f.callers++
	s.mu.Unlock()

	select {
	case <-f.done:
		if f.err != nil {
			var be *BuildError
			if errors.As(f.err, &be) {
				return f.err
			}
			return h.fail("build", f.err)
		}
		return nil
	case <-ctx.Done():
		s.mu.Lock()
		f.callers--
		if f.callers == 0 {
			// Nobody waits any more: stop the attempt. A new caller starts
			// a new one (which waits for this one's local lock).
			f.cancel()
			if s.flights[h.id] == f {
				delete(s.flights, h.id)
			}
		}
		s.mu.Unlock()
		return h.fail("build", ctx.Err())
	}
}

func (s *Store) fly(f *flight, id string, builder func(context.Context) error) {
	defer s.wg.Done()
	err := s.build(f.ctx, id, builder, f.settle)
	s.mu.Lock()
	if s.flights[id] == f {
		delete(s.flights, id)
	}
	f.settle(err)
	s.mu.Unlock()
	f.cancel()
}

// settle gives the attempt's outcome to its callers; later calls do
// nothing. The attempt settles early when it saw another host publish, so
// its callers need not wait for its clean-up (deleting its lock key).
func (f *flight) settle(err error) {
	f.once.Do(func() {
		f.err = err
		close(f.done)
	})
}

// state is what etcd says about a package at one revision.
type state struct {
	rev         int64 // header revision of the read
	avail       *PackageRecord
	build       *BuildRecord
	buildModRev int64
}

// readState reads avail and build in one read-only Txn (no Raft write).
func (s *Store) readState(ctx context.Context, id string) (state, error) {
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(cctx).Then(clientv3.OpGet(s.availKey(id)), clientv3.OpGet(s.buildKey(id))).Commit()
	if err != nil {
		return state{}, err
	}
	st := state{rev: resp.Header.Revision}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		if st.avail, err = decode[PackageRecord](kvs[0].Value); err != nil {
			return state{}, err
		}
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		if st.build, err = decode[BuildRecord](kvs[0].Value); err != nil {
			return state{}, err
		}
		st.buildModRev = kvs[0].ModRevision
	}
	return st, nil
}

// build runs one shared attempt: wait for another host or take the lock and
// build. ctx is the flight's. published is called as soon as another host's
// publish is seen, before the clean-up of our place in the lock queue.
func (s *Store) build(ctx context.Context, id string, builder func(context.Context) error, published func(error)) error {
	unlock, err := s.lockLocal(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	for {
		ss, err := s.session(ctx)
		if err != nil {
			return err
		}
		st, err := s.readState(ctx, id)
		if err != nil {
			return err
		}
		if st.avail != nil {
			return nil
		}
		l, err := s.waitOrLock(ctx, ss, id, st, func() { published(nil) })
		if errors.Is(err, errPublished) {
			return nil
		}
		if errors.Is(err, ErrLeaseLost) && ctx.Err() == nil {
			continue // queue again on the new lease
		}
		if err != nil {
			return err
		}
		return s.buildLocked(ctx, ss, l, id, st.rev, builder)
	}
}

var errPublished = errors.New("published")

// waitOrLock queues for the package lock while watching the package's keys
// from just after st. It returns the held lock, errPublished when another
// host published first, or a *BuildError when the attempt we waited on
// failed. It calls published, before it gives up its place in the lock
// queue, when it sees the package published.
func (s *Store) waitOrLock(ctx context.Context, ss *session, id string, st state, published func()) (*lock, error) {
	if s.testHookWait != nil {
		s.testHookWait(id)
	}
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	// The watches start at the current revision, not at st.rev+1: etcd
	// delivers events to a watch that starts in the past only once it has
	// caught up, which its sync loop does every 100 ms, and a publish in
	// that window would reach us that much later. What changed between st
	// and the watches' start is read again below.
	availCh := s.cli.Watch(wctx, s.availKey(id), clientv3.WithCreatedNotify())
	buildCh := s.cli.Watch(wctx, s.buildKey(id), clientv3.WithCreatedNotify())
	from := int64(0)
	for _, ch := range []clientv3.WatchChan{availCh, buildCh} {
		select {
		case wr, ok := <-ch:
			if !ok || wr.Err() != nil || !wr.Created {
				return nil, s.watchEnded(ctx, ss, wr.Err())
			}
			// Events after this revision reach the watch (etcd reads it
			// after registering the watch).
			from = max(from, wr.Header.Revision)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if from > st.rev {
		now, err := s.readState(ctx, id)
		if err != nil {
			return nil, err
		}
		if now.avail != nil {
			published()
			return nil, errPublished
		}
		if b := now.build; b != nil && b.State == BuildFailed && now.buildModRev > st.rev {
			return nil, failedAttempt(id, b) // the attempt we found running failed meanwhile
		}
		st.build = now.build
	}

	l := s.newLock(ss, s.lockPrefix(id))
	lockErr := make(chan error, 1)
	go func() { lockErr <- l.lock(wctx) }()
	// giveUp stops the lock attempt and makes sure we do not keep it.
	giveUp := func(err error) (*lock, error) {
		cancel()
		if <-lockErr == nil {
			l.release()
		}
		return nil, err
	}

	if b := st.build; b != nil && b.State == BuildRunning {
		s.emit(Event{Kind: EventWaiting, ID: id, Host: b.Host, PID: b.PID, Since: b.Started, LogDir: b.LogDir})
	}
	for {
		select {
		case err := <-lockErr:
			if err != nil {
				return nil, err
			}
			return l, nil
		case wr, ok := <-availCh:
			if !ok || wr.Err() != nil {
				return giveUp(s.watchEnded(ctx, ss, wr.Err()))
			}
			for _, ev := range wr.Events {
				if ev.Type == clientv3.EventTypePut {
					// Release our callers now: the lock key's deletion
					// below is one more round trip they need not wait for
					// (the local lock stays held until it is done).
					published()
					if s.testHookCleanup != nil {
						s.testHookCleanup(id)
					}
					return giveUp(errPublished)
				}
			}
		case wr, ok := <-buildCh:
			if !ok || wr.Err() != nil {
				return giveUp(s.watchEnded(ctx, ss, wr.Err()))
			}
			for _, ev := range wr.Events {
				if ev.Type != clientv3.EventTypePut {
					continue // a builder's lease ended: the lock comes our way
				}
				b, err := decode[BuildRecord](ev.Kv.Value)
				if err != nil {
					continue
				}
				switch b.State {
				case BuildFailed:
					return giveUp(failedAttempt(id, b))
				case BuildRunning:
					s.emit(Event{Kind: EventWaiting, ID: id, Host: b.Host, PID: b.PID, Since: b.Started, LogDir: b.LogDir})
				}
			}
		case <-ctx.Done():
			return giveUp(ctx.Err())
		}
	}
}

// watchEnded turns the end of a watch into ErrLeaseLost (so build retries
// from a fresh read: compaction, lost leader, lease gone) or ctx's error.
func (s *Store) watchEnded(ctx context.Context, ss *session, err error) error {
	if ctx.Err() != nil {
		return ctx.Err()
	}
	if err == nil {
		err = errors.New("watch closed")
	}
	s.opt.logger.Debug("watch ended; reading state again", "err", err)
	// Avoid spinning while etcd has no leader.
	select {
	case <-time.After(100 * time.Millisecond):
	case <-ctx.Done():
		return ctx.Err()
	case <-ss.ctx.Done():
	}
	return fmt.Errorf("%w: %v", ErrLeaseLost, err) // retried by build
}

func failedAttempt(id string, b *BuildRecord) *BuildError {
	return &BuildError{ID: id, Host: b.Host, PID: b.PID, LogDir: b.LogDir, Err: errors.New(b.Error)}
}

// buildLocked runs steps 4–7 of BuildContext while l is held. startRev is
// the revision the wait started from.
func (s *Store) buildLocked(ctx context.Context, ss *session, l *lock, id string, startRev int64, builder func(context.Context) error) error {
	defer l.release()
	st, err := s.readState(ctx, id)
	if err != nil {
		return err
	}
	if st.avail != nil {
		return nil // published by the holder before us
	}
	if b := st.build; b != nil && b.State == BuildFailed && st.buildModRev > startRev {
		// The attempt we were waiting on failed just before we got the lock:
		// report it rather than retrying the same broken build at once.
		return failedAttempt(id, b)
	}

	// Record the attempt on our lease, only while we own the lock. Its
	// deletion (lease expiry) tells waiters this attempt died.
	rec := BuildRecord{State: BuildRunning, Host: s.opt.host, PID: s.pid, Started: time.Now(), LogDir: s.logDir(id), Attempt: l.rev}
	buildRev, err := s.putBuild(ctx, ss, l, id, rec)
	if err != nil {
		return err
	}

	// Leftovers of a dead attempt go to the trash after the lock delay; the
	// attempt's directories are made without trusting this host's cache.
	if err := s.prepareAttempt(ctx, id, st.build); err != nil {
		return s.failed(ctx, ss, l, id, rec, err)
	}

	start := time.Now()
	fromCache, err := s.fetchCache(ctx, ss, id)
	if err != nil {
		return s.failed(ctx, ss, l, id, rec, err)
	}
	if !fromCache {
		s.emit(Event{Kind: EventBuilding, ID: id, Host: s.opt.host, PID: s.pid, Since: rec.Started, LogDir: rec.LogDir})
		bctx, stop := mergeCancel(ctx, ss.ctx)
		err = runBuilder(bctx, builder)
		switch cause := stopCause(bctx, ss); {
		case cause == nil:
		case err == nil:
			err = cause // the builder ignored its cancellation
		case !errors.Is(err, cause):
			// Say why the builder was stopped ("signal: killed" alone
			// does not tell a lost lease from a crash).
			err = fmt.Errorf("%w (builder stopped: %w)", err, cause)
		}
		stop()
		if err != nil {
			return s.failed(ctx, ss, l, id, rec, err)
		}
	}

	digest, size, err := sealTree(s.outputDir(id))
	if err == nil {
		err = syncTree(s.outputDir(id))
	}
	if err != nil {
		return s.failed(ctx, ss, l, id, rec, fmt.Errorf("seal output: %w", err))
	}
	pkg := PackageRecord{
		BuiltBy: s.opt.host, PID: s.pid, BuiltAt: time.Now().UTC(), BuildSeconds: time.Since(start).Seconds(),
		Size: size, Digest: digest, FromCache: fromCache, Attempt: l.rev,
	}
	if err := s.publish(ctx, l, id, buildRev, pkg); err != nil {
		if errors.Is(err, ErrFenced) {
			// Someone else holds the lock now and owns the tree; leave it.
			return &BuildError{ID: id, Host: s.opt.host, PID: s.pid, LogDir: rec.LogDir, Err: err}
		}
		return s.failed(ctx, ss, l, id, rec, err)
	}
	s.emit(Event{Kind: EventPublished, ID: id, Host: s.opt.host, PID: s.pid, Since: rec.Started, LogDir: rec.LogDir,
		Elapsed: time.Since(start), Size: size, Digest: digest})
	s.storeCache(ctx, id, pkg)
	return nil
}

// runBuilder calls builder, turning a panic into an error.
func runBuilder(ctx context.Context, builder func(context.Context) error) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("builder panicked: %v\n%s", r, debug.Stack())
		}
	}()
	return builder(ctx)
}

// putBuild records the attempt, fenced by lock ownership, and returns the
// revision of the record.
func (s *Store) putBuild(ctx context.Context, ss *session, l *lock, id string, rec BuildRecord) (int64, error) {
	val := mustJSON(rec)
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Txn(cctx).
		If(l.isOwner()). // only the lock owner may claim the attempt
		Then(clientv3.OpPut(s.buildKey(id), val, clientv3.WithLease(ss.id))).
		Commit()
	cancel()
	if err == nil {
		if !resp.Succeeded {
			return 0, fmt.Errorf("%w: lock lost before the build started", ErrLeaseLost)
		}
		return resp.Header.Revision, nil
	}
	// Ambiguous: read back whether our record is there.
	rctx, rcancel := s.opCtx(ctx)
	got, rerr := s.cli.Get(rctx, s.buildKey(id))
	rcancel()
	if rerr == nil && len(got.Kvs) == 1 && string(got.Kvs[0].Value) == val {
		return got.Kvs[0].ModRevision, nil
	}
	return 0, errors.Join(err, rerr)
}

// publish makes the package available in one Txn that holds only while we
// own the lock and our attempt record is the one we wrote: a builder that
// lost its lock (lease expired while it was frozen) cannot publish.
func (s *Store) publish(ctx context.Context, l *lock, id string, buildRev int64, pkg PackageRecord) error {
	val := mustJSON(pkg)
	now := time.Now()
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Txn(cctx).
		If(
			l.isOwner(), // fencing: we still hold the build lock
			clientv3.Compare(clientv3.ModRevision(s.buildKey(id)), "=", buildRev), // and our attempt record stands
		).
		Then(
			clientv3.OpPut(s.availKey(id), val),              // available, for good (no lease)
			clientv3.OpPut(s.atimeKey(id), formatNanos(now)), // fresh packages are not pruned first
			clientv3.OpDelete(s.buildKey(id)),                // the attempt is over
			l.releaseOp(),                                    // and so is our hold on the lock
		).Commit()
	cancel()
	if err == nil {
		if !resp.Succeeded {
			return ErrFenced
		}
		l.gone = true
		return nil
	}
	// Ambiguous: only our Txn writes an avail record with our attempt.
	rctx, rcancel := s.opCtx(context.WithoutCancel(ctx))
	got, rerr := s.cli.Get(rctx, s.availKey(id))
	rcancel()
	if rerr == nil && len(got.Kvs) == 1 {
		if p, derr := decode[PackageRecord](got.Kvs[0].Value); derr == nil && p.Attempt == pkg.Attempt {
			l.gone = true
			return nil
		}
	}
	return errors.Join(fmt.Errorf("publish: %w", err), rerr)
}

// failed ends an attempt that did not publish: the record turns to
// "failed" (so the waiters of this attempt fail too), the lock is released
// in the same Txn, and the partial tree goes to the trash with the logs
// kept. If we no longer own the lock, the tree belongs to whoever does and
// is left alone.
func (s *Store) failed(ctx context.Context, ss *session, l *lock, id string, rec BuildRecord, cause error) error {
	s.opt.logger.Warn("build failed", "id", id, "err", cause)
	rec.State = BuildFailed
	rec.Error = cause.Error()
	// Tell the waiters this attempt failed, unless it was merely abandoned
	// (every caller cancelled): then they should simply try themselves.
	tell := clientv3.OpPut(s.buildKey(id), mustJSON(rec), clientv3.WithLease(ss.id))
	if errors.Is(cause, context.Canceled) || errors.Is(cause, context.DeadlineExceeded) || errors.Is(cause, ErrAbandon) {
		tell = clientv3.OpDelete(s.buildKey(id))
	}
	cctx, cancel := s.opCtx(context.WithoutCancel(ctx))
	resp, err := s.cli.Txn(cctx).
		If(l.isOwner()). // the tree is ours to clear only while we hold the lock
		Then(tell, l.releaseOp()).
		Commit()
	cancel()
	owner := err == nil && resp.Succeeded
	if owner {
		l.gone = true
		if terr := s.moveToTrash(s.outputDir(id)); terr != nil {
			cause = errors.Join(cause, terr)
		}
	} else if err == nil {
		cause = errors.Join(cause, fmt.Errorf("%w; the tree was left to the new owner", ErrFenced))
	}
	s.emit(Event{Kind: EventFailed, ID: id, Host: s.opt.host, PID: s.pid, Since: rec.Started, LogDir: rec.LogDir, Err: cause})
	return &BuildError{ID: id, Host: s.opt.host, PID: s.pid, LogDir: rec.LogDir, Err: cause}
}

// stopCause says why work merged from ctx and the session's context must
// stop, or nil. It asks the session directly: the merged context learns of
// the session's end a moment later, from another goroutine.
func stopCause(ctx context.Context, ss *session) error {
	if ctx.Err() != nil {
		return context.Cause(ctx)
	}
	if ss.ctx.Err() != nil {
		return context.Cause(ss.ctx)
	}
	return nil
}

// fetchCache tries the remote cache into the (empty) output directory.
//
// Like a builder, the fetch ends when the lease is in doubt, and then it
// touches the tree no more: after the lock delay it may be another host's.
// An error means the attempt must fail (lease lost, caller gone, or the
// leftovers of a failed fetch could not be cleared); a failed fetch
// itself is a miss.
func (s *Store) fetchCache(ctx context.Context, ss *session, id string) (bool, error) {
	c := s.opt.cache
	if c == nil {
		return false, nil
	}
	fctx, stop := mergeCancel(ctx, ss.ctx)
	defer stop()
	ok, err := c.Fetch(fctx, id, s.outputDir(id))
	if cause := stopCause(fctx, ss); cause != nil {
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
		if err := os.MkdirAll(s.outputDir(id), 0o755); err != nil {
			return false, err
		}
		return false, nil
	}
	s.emit(Event{Kind: EventCacheHit, ID: id, Host: s.opt.host, PID: s.pid})
	return true, nil
}

// storeCache uploads a freshly built package in the background, holding a
// reference while the tree is read so that no host removes it meanwhile
// (if the store is closing already, it uploads without one). The event
// comes after the reference is released.
func (s *Store) storeCache(ctx context.Context, id string, pkg PackageRecord) {
	c := s.opt.cache
	if c == nil || pkg.FromCache {
		return
	}
	// Take the reference before Build returns: a CLI closes its store right
	// after, and Close cancels s.ctx before it waits for the upload.
	h := s.Handle(id)
	held := h.IncRefContext(context.WithoutCancel(ctx)) == nil
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		if held {
			h.DecRefContext(context.Background()) //nolint:errcheck // Close revokes the lease anyway
		}
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		// Not s.ctx: Close waits for the upload instead of cutting it
		// short, so a short-lived store (one CLI command) still fills the
		// cache. The cache's own deadlines bound it.
		start := time.Now()
		err := c.Store(context.Background(), id, s.outputDir(id), pkg)
		elapsed := time.Since(start)
		if held {
			h.DecRefContext(context.Background()) //nolint:errcheck // a failure is retried in the background; Close revokes the lease anyway
		}
		if err != nil {
			s.opt.logger.Warn("remote cache upload failed", "id", id, "err", err)
			s.emit(Event{Kind: EventCacheUploadFailed, ID: id, Err: err})
			return
		}
		s.emit(Event{Kind: EventCacheStored, ID: id, Elapsed: elapsed, Size: pkg.Size, Digest: pkg.Digest})
	}()
}
