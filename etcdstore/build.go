package etcdstore

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// How says how a Build call came by its package.
type How int

// The ways a Build call ends with the package available.
const (
	// AlreadyAvailable: the package was published before the attempt began.
	AlreadyAvailable How = iota + 1
	// Built: this store ran the builder and published.
	Built
	// FromCache: this store fetched the tree from the remote cache and
	// published it; the builder did not run.
	FromCache
	// Waited: another host's attempt published while this store waited.
	Waited
)

var howNames = map[How]string{AlreadyAvailable: "already available", Built: "built", FromCache: "from cache", Waited: "waited"}

func (h How) String() string {
	if s, ok := howNames[h]; ok {
		return s
	}
	return "unknown"
}

// Outcome is what a successful Build did.
type Outcome struct {
	How     How
	Package *PackageRecord // the published record (who built it, when, size, digest)
	LogDir  string         // the package's logging directory
	Waited  time.Duration  // time spent waiting for another host's attempt
	Elapsed time.Duration  // from the call to its return
}

// Build is BuildContext with a background context, for the cipkg contract.
func (h *Handle) Build(builder func() error) error {
	return h.BuildContext(context.Background(), func(context.Context) error { return builder() })
}

// BuildContext is BuildOutcome without the outcome.
func (h *Handle) BuildContext(ctx context.Context, builder func(ctx context.Context) error) error {
	_, err := h.BuildOutcome(ctx, builder)
	return err
}

// BuildOutcome makes the package available, running builder at most once
// across every store that shares the root and the etcd cluster, and says
// how it did:
//
//  1. Callers of this store join its attempt for the package, if one is
//     in flight, before any etcd round trip: one attempt per store and ID.
//  2. The attempt reads the package's state; a published package ends it
//     (AlreadyAvailable).
//  3. The attempt watches the package's keys and, at the same time, queues
//     for its lock (wait.go). A publish by another host ends the wait at
//     once (Waited); a failure of the attempt we waited on returns an error
//     wrapping core.ErrBuildFailed; a crashed builder's lease expiry hands
//     us the lock.
//  4. Holding the lock, the attempt (attempt.go) claims the package on our
//     lease, fenced by lock ownership; clears leftovers of an attempt that
//     did not end cleanly (after the lock delay); fetches from the remote
//     cache or runs builder with a context that ends when ctx ends, when
//     every caller gave up, or when our lease is in doubt (a panic becomes
//     an error); seals the tree (read-only, size, digest, flushed); and
//     publishes in one Txn that holds only while we still own the lock
//     (Built or FromCache).
//  5. Failure: the partial tree goes to the trash, logs stay, the lock is
//     released in the Txn that records the failure, and the error (a
//     *BuildError wrapping the builder's) goes to every caller of this
//     attempt and to the waiters on other hosts. The next attempt starts
//     without the lock delay.
//
// BuildOutcome blocks until one of these ends or ctx is done.
func (h *Handle) BuildOutcome(ctx context.Context, builder func(ctx context.Context) error) (Outcome, error) {
	start := time.Now()
	if h.err != nil {
		return Outcome{}, h.fail("build", h.err)
	}
	f, settled, err := h.s.join(ctx, h.id, builder)
	if err != nil {
		return Outcome{}, h.fail("build", err)
	}
	select {
	case <-f.done:
		if f.err != nil {
			var be *BuildError
			if errors.As(f.err, &be) {
				return Outcome{}, f.err
			}
			return Outcome{}, h.fail("build", f.err)
		}
		out := f.out
		// Hand the package out only once this host can see it: its view
		// of the shared root may be stale (NFS lookup caches).
		if err := h.s.awaitVisibleWhilePublished(ctx, h.id, out.Package); err != nil {
			return Outcome{}, h.fail("build", err)
		}
		if settled {
			// The flight had seen the publish before we came: for us the
			// package was there already.
			out.How, out.Waited = AlreadyAvailable, 0
		}
		out.Elapsed = time.Since(start)
		return out, nil
	case <-ctx.Done():
		h.s.leave(h.id, f)
		return Outcome{}, h.fail("build", ctx.Err())
	}
}

// BuilderProcess names the process that runs a build's builder when it is
// not the store's own (a node runs the builders of its local callers in
// their processes): the build record, and so `granary status`, `events`
// and a refused removal, name it instead of the store's process.
type BuilderProcess struct {
	PID     int    // the process that runs the builder
	Command string // what it runs, for people (e.g. "granary build ID -- make")
}

type builderProcessKey struct{}

// WithBuilderProcess returns ctx carrying p: a Build with it that starts
// an attempt records p as the attempt's process.
func WithBuilderProcess(ctx context.Context, p BuilderProcess) context.Context {
	return context.WithValue(ctx, builderProcessKey{}, p)
}

// flight is one build attempt shared by the goroutines of this store that
// ask for the same package at the same time.
type flight struct {
	done    chan struct{}
	once    sync.Once
	out     Outcome // set before done is closed
	err     error   // likewise
	ctx     context.Context
	cancel  context.CancelFunc
	callers int // guarded by Store.mu; the attempt is cancelled when it drops to 0
}

// join adds a caller to the package's flight, starting one if none is in
// the air (with the caller's builder, and the builder process named by
// ctx, if any: WithBuilderProcess). It does no I/O. settled reports that
// the flight had its outcome already (it saw a publish and is cleaning up).
func (s *Store) join(ctx context.Context, id string, builder func(context.Context) error) (f *flight, settled bool, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil, false, ErrClosed
	}
	f = s.flights[id]
	if f == nil {
		f = &flight{done: make(chan struct{})}
		fctx := s.ctx
		if p, ok := ctx.Value(builderProcessKey{}).(BuilderProcess); ok {
			fctx = context.WithValue(fctx, builderProcessKey{}, p)
		}
		fctx = flightNeeds(ctx, fctx)
		f.ctx, f.cancel = context.WithCancel(fctx)
		s.flights[id] = f
		s.wg.Add(1) // under s.mu with closed checked: as in spawn
		go s.fly(f, id, builder)
	}
	f.callers++
	select {
	case <-f.done:
		settled = true
	default:
	}
	return f, settled, nil
}

// leave removes a caller that gave up. When none is left the attempt is
// cancelled; a new caller starts a new one (which waits for this one's
// local lock).
func (s *Store) leave(id string, f *flight) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f.callers--
	if f.callers == 0 {
		f.cancel()
		if s.flights[id] == f {
			delete(s.flights, id)
		}
	}
}

// flying returns the flight of id in this store, or nil.
func (s *Store) flying(id string) *flight {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.flights[id]
}

func (s *Store) fly(f *flight, id string, builder func(context.Context) error) {
	defer s.wg.Done()
	out, err := s.build(f.ctx, id, builder, f.settle)
	s.mu.Lock()
	if s.flights[id] == f {
		delete(s.flights, id)
	}
	s.mu.Unlock()
	f.settle(out, err)
	f.cancel()
}

// settle gives the attempt's outcome to its callers; later calls do
// nothing. The attempt settles early when it saw another host publish, so
// its callers need not wait for its clean-up (deleting its lock key).
func (f *flight) settle(out Outcome, err error) {
	f.once.Do(func() {
		f.out, f.err = out, err
		close(f.done)
	})
}

// state is what etcd says about a package at one revision.
type state struct {
	rev         int64 // header revision of the read
	avail       *PackageRecord
	availRev    int64 // its mod revision
	build       *BuildRecord
	buildModRev int64
	invalid     *InvalidRecord // the package was invalidated (invalid.go)
	pin         *PinRecord     // its pin, expired or not (pins.go)
	pinRev      int64
}

// readState reads avail, build and invalid in one read-only Txn (no Raft
// write).
func (s *Store) readState(ctx context.Context, id string) (state, error) {
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(cctx).Then(clientv3.OpGet(s.keys.AvailKey(id)), clientv3.OpGet(s.keys.BuildKey(id)),
		clientv3.OpGet(s.keys.InvalidKey(id)), clientv3.OpGet(s.keys.PinKey(id))).Commit()
	if err != nil {
		return state{}, err
	}
	st := state{rev: resp.Header.Revision}
	if kvs := resp.Responses[0].GetResponseRange().Kvs; len(kvs) > 0 {
		if st.avail, err = decode[PackageRecord](kvs[0].Value); err != nil {
			return state{}, err
		}
		st.availRev = kvs[0].ModRevision
	}
	if kvs := resp.Responses[2].GetResponseRange().Kvs; len(kvs) > 0 {
		if st.invalid, err = decode[InvalidRecord](kvs[0].Value); err != nil {
			return state{}, err
		}
	}
	if kvs := resp.Responses[3].GetResponseRange().Kvs; len(kvs) > 0 {
		if st.pin, err = decode[PinRecord](kvs[0].Value); err != nil {
			return state{}, err
		}
		st.pinRev = kvs[0].ModRevision
	}
	if kvs := resp.Responses[1].GetResponseRange().Kvs; len(kvs) > 0 {
		if st.build, err = decode[BuildRecord](kvs[0].Value); err != nil {
			return state{}, err
		}
		st.buildModRev = kvs[0].ModRevision
	}
	return st, nil
}

// retryError says the attempt must start over from a fresh read: a watch
// ended (compaction, a lost leader) or the lease was replaced while we
// queued.
type retryError struct{ why error }

func (e *retryError) Error() string { return "start over: " + e.why.Error() }
func (e *retryError) Unwrap() error { return e.why }

// build runs one shared attempt (steps 2–5 of BuildOutcome). ctx is the
// flight's. published settles the flight as soon as another host's publish
// is seen, before the clean-up of our place in the lock queue.
func (s *Store) build(ctx context.Context, id string, builder func(context.Context) error, published func(Outcome, error)) (Outcome, error) {
	for tries := 1; ; tries++ {
		out, err := s.lockedPass(ctx, id, builder, published)
		var retry *retryError
		var be *BuildError
		var inv *invalidWait
		switch {
		case err == nil:
			return out, nil
		case ctx.Err() != nil:
			return out, err
		case errors.As(err, &inv):
			// Wait for the removal without our local lock: the removal
			// may be this store's own.
			if err := s.awaitRemoval(ctx, id, inv); err != nil && !errors.As(err, &retry) {
				return out, err
			}
			continue // a watch cut short: read again
		case errors.As(err, &retry):
			continue // queue again, on the new lease if it was replaced
		case transient(err) && !errors.As(err, &be) && tries < 4:
			// No answer from the member the call went to (it froze or
			// its connection was closed to move off it). Nothing was
			// claimed yet: start over on another member.
			s.opt.logger.Debug("etcd call failed without an answer; starting over", "id", id, "err", err)
			if !sleepCtx(ctx, time.Duration(tries)*100*time.Millisecond) {
				return out, err
			}
			continue
		}
		return out, err
	}
}

// lockedPass is pass under the package's local lock.
func (s *Store) lockedPass(ctx context.Context, id string, builder func(context.Context) error, published func(Outcome, error)) (Outcome, error) {
	unlock, err := s.lockLocal(ctx, id)
	if err != nil {
		return Outcome{}, err
	}
	defer unlock()
	return s.pass(ctx, id, builder, published)
}

// pass is one pass of the attempt from a fresh read: the fast path, the
// wait, and the attempt under the lock.
func (s *Store) pass(ctx context.Context, id string, builder func(context.Context) error, published func(Outcome, error)) (Outcome, error) {
	ls, err := s.sess.Current(ctx)
	if err != nil {
		return Outcome{}, err
	}
	st, err := s.readState(ctx, id)
	if err != nil {
		return Outcome{}, err
	}
	if st.avail != nil {
		if st.invalid != nil {
			return Outcome{}, &invalidWait{rev: st.rev, rec: st.invalid}
		}
		return Outcome{How: AlreadyAvailable, Package: st.avail, LogDir: s.logDir(id)}, nil
	}
	w := &waiter{s: s, ls: ls, id: id, st: st, published: published}
	l, out, err := w.waitOrLock(ctx)
	if errors.Is(err, ErrLeaseLost) && ctx.Err() == nil {
		// The lease ended while we queued: queue again on the new one
		// (Current above fails if there is none within the deadline).
		return out, &retryError{why: err}
	}
	if err != nil || l == nil {
		return out, err
	}
	a := &attempt{s: s, id: id, ls: ls, l: l, startRev: st.rev, waitStart: w.start, sawRunning: w.sawRunning(), needs: attemptNeeds(ctx)}
	return a.run(ctx, builder)
}

// transient reports an etcd call that failed without an answer because
// the member it went to became unavailable (a closed connection, a
// member being left because it froze, a leader change): the same call on
// another member may succeed.
func transient(err error) bool {
	if errors.Is(err, rpctypes.ErrLeaderChanged) {
		return true
	}
	st, ok := status.FromError(err)
	return ok && st.Code() == codes.Unavailable
}
