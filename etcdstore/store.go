package etcdstore

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"github.com/cenkalti/backoff/v4"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
)

var (
	_ core.PackageManager = (*Store)(nil)
	_ core.ContextHandler = (*Handle)(nil)
)

// Store is the etcd-backed package manager of one participant. It is safe
// for concurrent use. Close it to release its lease.
type Store struct {
	cli  *clientv3.Client
	root string
	opt  options
	pid  int

	mount   MountInfo   // the root's mount, checked by New (mount.go)
	visible visibleMemo // published attempts this store has seen (visible.go)

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // flights, lease guard, re-establishment, background clean-up

	// refMu is held for reading while a reference is taken or released, and
	// for writing while references move to a new lease.
	refMu sync.RWMutex

	mu      sync.Mutex
	closed  bool
	sess    *session           // nil while a new lease is being made
	ready   chan struct{}      // closed when sess is set or the store closes
	sessErr error              // why the last attempt at a new lease failed
	retired []clientv3.LeaseID // leases given up on but not yet revoked
	flights map[string]*flight
	locals  map[string]*localLock
	refs    map[string][]*ref // by package ID, newest last
	refSeq  uint64

	// testHookCleanup, set only by tests before use, runs after a waiting
	// attempt saw a publish and released its callers, before it leaves the
	// lock queue.
	testHookCleanup func(id string)
	// testHookWait, likewise, runs when an attempt starts to wait, between
	// its read of the package's state and the start of its watches.
	testHookWait func(id string)
}

// New returns a Store that keeps packages under root and coordinates
// through cli. It checks that etcd answers, binds root to etcd's cluster and
// prefix both ways (refusing a root bound to another one with
// ErrForeignCluster, and a root that is not the prefix's shared root with
// ErrNotSharedRoot; see WithInitRoot) and creates the store's lease. A root
// that does not exist is created, with a warning, only when the prefix has
// no shared root yet. The caller keeps ownership of cli and must Close the
// Store before closing cli.
func New(ctx context.Context, cli *clientv3.Client, root string, opts ...Option) (*Store, error) {
	o := defaultOptions()
	for _, fn := range opts {
		fn(&o)
	}
	if err := o.validate(); err != nil {
		return nil, fmt.Errorf("etcdstore: %w", err)
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("etcdstore: root %q: %w", root, err)
	}
	s := &Store{
		cli:     cli,
		root:    abs,
		opt:     o,
		pid:     os.Getpid(),
		ready:   make(chan struct{}),
		flights: make(map[string]*flight),
		locals:  make(map[string]*localLock),
		refs:    make(map[string][]*ref),
	}
	if err := s.openRoot(ctx); err != nil {
		return nil, err
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	sess, err := s.newSession(ctx)
	if err != nil {
		s.cancel()
		return nil, fmt.Errorf("etcdstore: create lease: %w", err)
	}
	s.install(sess)
	return s, nil
}

// Root returns the absolute path of the shared root.
func (s *Store) Root() string { return s.root }

// Client returns the etcd client the store uses.
func (s *Store) Client() *clientv3.Client { return s.cli }

// Prefix returns the etcd key prefix.
func (s *Store) Prefix() string { return s.opt.prefix }

// Lease returns the ID of the store's current lease, or 0 while a new one is
// being made.
func (s *Store) Lease() clientv3.LeaseID {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.sess == nil {
		return 0
	}
	return s.sess.id
}

// Get returns the handler of package id. It does no I/O.
func (s *Store) Get(id string) core.PackageHandler { return s.Handle(id) }

// Handle is Get with the concrete type, which has the context-aware methods.
func (s *Store) Handle(id string) *Handle {
	return &Handle{s: s, id: id, err: core.ValidateID(id)}
}

// Close ends the store, in this order:
//  1. new operations fail with ErrClosed;
//  2. running builds are cancelled (they cannot publish after this) and
//     Close waits for their builders to return;
//  3. background work (lease renewal, clean-up of trash) stops, and
//     uploads to the remote cache that are under way finish (each bounded
//     by the cache's own deadlines);
//  4. the lease is revoked, so this store's references and locks drop at
//     once instead of after the TTL.
//
// Close returns an error if the revocation did not reach etcd; the lease then
// expires on its own after the TTL.
func (s *Store) Close() error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	sess := s.sess
	s.sess = nil
	select {
	case <-s.ready:
	default:
		close(s.ready)
	}
	s.mu.Unlock()

	s.cancel()
	s.wg.Wait()
	s.mu.Lock()
	leases := s.retired
	s.mu.Unlock()
	if sess != nil {
		sess.end(ErrClosed)
		leases = append(leases, sess.id)
	}
	var errs []error
	for _, id := range leases {
		errs = append(errs, s.revoke(id))
	}
	return errors.Join(errs...)
}

func (s *Store) revoke(id clientv3.LeaseID) error {
	ctx, cancel := s.opCtx(context.Background())
	defer cancel()
	if _, err := s.cli.Revoke(ctx, id); err != nil {
		return fmt.Errorf("etcdstore: revoke lease %x (it expires within %v): %w", int64(id), s.opt.ttl, err)
	}
	return nil
}

// opCtx bounds one etcd call: a deadline, and fail fast without a leader.
func (s *Store) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(clientv3.WithRequireLeader(ctx), s.opt.opTimeout)
}

// Keys and paths.

func (s *Store) key(kind, id string) string { return s.opt.prefix + kind + "/" + id }
func (s *Store) availKey(id string) string  { return s.key("avail", id) }
func (s *Store) buildKey(id string) string  { return s.key("build", id) }
func (s *Store) atimeKey(id string) string  { return s.key("atime", id) }
func (s *Store) refPrefix(id string) string { return s.key("ref", id) + "/" }
func (s *Store) lockPrefix(id string) string {
	return s.key("lock", id) + "/"
}
func (s *Store) pkgsDir() string            { return filepath.Join(s.root, "pkgs") }
func (s *Store) trashDir() string           { return filepath.Join(s.root, ".trash") }
func (s *Store) pkgDir(id string) string    { return filepath.Join(s.pkgsDir(), id) }
func (s *Store) outputDir(id string) string { return filepath.Join(s.pkgDir(id), "contents") }
func (s *Store) logDir(id string) string    { return filepath.Join(s.pkgDir(id), "logs") }

// session is one lease and the context that lives while it can be trusted.
type session struct {
	id  clientv3.LeaseID
	hex string
	// ctx is cancelled, with the reason as its cause, the moment the lease
	// is in doubt, lost or revoked.
	ctx      context.Context
	cancel   context.CancelCauseFunc
	kaCancel context.CancelFunc
}

func (ss *session) end(cause error) {
	ss.cancel(cause)
	ss.kaCancel()
}

// newSession grants a lease and starts its keep-alive and the guard that
// watches the acknowledgements.
func (s *Store) newSession(ctx context.Context) (*session, error) {
	cctx, cancel := s.opCtx(ctx)
	grant, err := s.cli.Grant(cctx, int64(s.opt.ttl/time.Second))
	cancel()
	if err != nil {
		return nil, err
	}
	granted := time.Now()
	kactx, kaCancel := context.WithCancel(s.ctx)
	ka, err := s.cli.KeepAlive(kactx, grant.ID)
	if err != nil {
		kaCancel()
		return nil, err
	}
	sctx, scancel := context.WithCancelCause(s.ctx)
	ss := &session{
		id:       grant.ID,
		hex:      fmt.Sprintf("%x", int64(grant.ID)),
		ctx:      sctx,
		cancel:   scancel,
		kaCancel: kaCancel,
	}
	s.wg.Add(1)
	go s.guard(ss, ka, granted)
	return ss, nil
}

// install makes ss the current session. It reports false, and revokes ss,
// if the store closed meanwhile.
func (s *Store) install(ss *session) bool {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ss.end(ErrClosed)
		s.revoke(ss.id) //nolint:errcheck // best effort: the lease expires anyway
		return false
	}
	s.sess = ss
	s.sessErr = nil
	close(s.ready)
	s.mu.Unlock()
	return true
}

// doubtAfter is how long the guard waits for a keep-alive acknowledgement
// before it distrusts the lease: two renewal rounds (each TTL/3) have then
// gone unanswered, and the server, which counts the TTL from a renewal that
// came before our last acknowledgement, cannot have expired the lease for at
// least another TTL/3.
func (s *Store) doubtAfter() time.Duration { return s.opt.ttl * 2 / 3 }

// guard watches the keep-alive acknowledgements of ss and declares the
// lease lost when they stop, before the server can expire it.
func (s *Store) guard(ss *session, ka <-chan *clientv3.LeaseKeepAliveResponse, granted time.Time) {
	defer s.wg.Done()
	wait := s.doubtAfter()
	t := time.NewTimer(time.Until(granted.Add(wait)))
	defer t.Stop()
	for {
		select {
		case _, ok := <-ka:
			if !ok {
				s.lost(ss, errors.New("keep-alive stream ended (lease expired or revoked)"))
				return
			}
			t.Reset(wait)
		case <-t.C:
			s.lost(ss, fmt.Errorf("no keep-alive acknowledgement for %v of a %v TTL", wait, s.opt.ttl))
			return
		case <-ss.ctx.Done():
			return
		}
	}
}

// lost retires ss: its builds are cancelled, and a new lease is made in the
// background, onto which the held references move.
func (s *Store) lost(ss *session, why error) {
	s.mu.Lock()
	if s.closed || s.sess != ss {
		s.mu.Unlock()
		return
	}
	s.sess = nil
	s.ready = make(chan struct{})
	s.retired = append(s.retired, ss.id)
	s.mu.Unlock()

	cause := fmt.Errorf("%w: %v", ErrLeaseLost, why)
	ss.end(cause)
	s.opt.logger.Warn("etcd lease lost; cancelling builds and making a new lease", "lease", ss.hex, "why", why)
	s.emit(Event{Kind: EventLeaseLost, Err: cause})
	s.wg.Add(1)
	go s.reestablish(ss)
}

func (s *Store) reestablish(old *session) {
	defer s.wg.Done()
	b := backoff.WithContext(backoff.NewExponentialBackOff(
		backoff.WithInitialInterval(100*time.Millisecond),
		backoff.WithMaxInterval(5*time.Second),
		backoff.WithMaxElapsedTime(0),
	), s.ctx)
	var ss *session
	err := backoff.RetryNotify(func() error {
		var err error
		ss, err = s.newSession(s.ctx)
		return err
	}, b, func(err error, next time.Duration) {
		s.mu.Lock()
		s.sessErr = err
		s.mu.Unlock()
		s.opt.logger.Warn("cannot make a new etcd lease yet", "err", err, "retry_in", next)
	})
	if err != nil {
		return // closing
	}
	s.retakeRefs(ss)
	if !s.install(ss) {
		return
	}
	s.opt.logger.Info("new etcd lease in place", "lease", ss.hex)
	s.emit(Event{Kind: EventLeaseRestored})
	// The old lease may still be alive (we only doubted it): revoke it so
	// its lock keys and the references we just took again do not linger.
	if err := s.revoke(old.id); err != nil {
		s.opt.logger.Debug("old lease not revoked; it will expire", "err", err)
		return
	}
	s.mu.Lock()
	s.retired = slices.DeleteFunc(s.retired, func(id clientv3.LeaseID) bool { return id == old.id })
	s.mu.Unlock()
}

// session returns the current lease. While a new one is being made it
// waits, for at most the operation timeout, so that no call hangs while
// etcd is away.
func (s *Store) session(ctx context.Context) (*session, error) {
	var deadline <-chan time.Time
	for {
		s.mu.Lock()
		closed, ss, ready, lastErr := s.closed, s.sess, s.ready, s.sessErr
		s.mu.Unlock()
		if closed {
			return nil, ErrClosed
		}
		if ss != nil && ss.ctx.Err() == nil {
			return ss, nil
		}
		if deadline == nil {
			t := time.NewTimer(s.opt.opTimeout)
			defer t.Stop()
			deadline = t.C
		}
		var retry <-chan time.Time
		if ss != nil {
			// The lease is cancelled but the guard has not retired it yet
			// (a moment's race): look again shortly.
			ready, retry = nil, time.After(10*time.Millisecond)
		}
		select {
		case <-ready:
		case <-retry:
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: waiting for a new lease: %w", ErrLeaseLost, ctx.Err())
		case <-deadline:
			if lastErr == nil {
				lastErr = errors.New("still trying")
			}
			return nil, fmt.Errorf("%w: no new lease within %v (last attempt: %v)", ErrLeaseLost, s.opt.opTimeout, lastErr)
		}
	}
}

// deleteLater deletes key in the background, retrying until it succeeds or
// the store closes (when the lease revocation takes the key with it). It is
// how a release that failed because etcd was unreachable is finished.
func (s *Store) deleteLater(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		b := backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0), backoff.WithMaxInterval(5*time.Second)), s.ctx)
		backoff.Retry(func() error { //nolint:errcheck // ends only by success or close
			ctx, cancel := s.opCtx(s.ctx)
			defer cancel()
			_, err := s.cli.Delete(ctx, key)
			return err
		}, b)
	}()
}

// localLock serialises, within this store, everything that takes the etcd
// lock of one package: two etcd Mutexes on one lease would both "own" it
// (etcd #10756).
type localLock struct {
	ch    chan struct{}
	users int // guarded by Store.mu
}

func (s *Store) localFor(id string) *localLock {
	s.mu.Lock()
	defer s.mu.Unlock()
	l := s.locals[id]
	if l == nil {
		l = &localLock{ch: make(chan struct{}, 1)}
		s.locals[id] = l
	}
	l.users++
	return l
}

func (s *Store) localDone(id string, l *localLock) {
	s.mu.Lock()
	defer s.mu.Unlock()
	l.users--
	if l.users == 0 {
		delete(s.locals, id)
	}
}

// lockLocal takes the package's local lock, waiting for ctx.
func (s *Store) lockLocal(ctx context.Context, id string) (unlock func(), err error) {
	l := s.localFor(id)
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; s.localDone(id, l) }, nil
	case <-ctx.Done():
		s.localDone(id, l)
		return nil, ctx.Err()
	}
}

// tryLockLocal takes the package's local lock if it is free.
func (s *Store) tryLockLocal(id string) (unlock func(), ok bool) {
	l := s.localFor(id)
	select {
	case l.ch <- struct{}{}:
		return func() { <-l.ch; s.localDone(id, l) }, true
	default:
		s.localDone(id, l)
		return nil, false
	}
}
