package etcdstore

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/cenkalti/backoff/v4"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/core"
	"github.com/granary-build/granary/internal/keys"
	"github.com/granary-build/granary/internal/paths"
)

var (
	_ core.PackageManager = (*Store)(nil)
	_ core.ContextHandler = (*Handle)(nil)
)

// Store is the etcd-backed package manager of one participant. It is safe
// for concurrent use. Close it to release its lease.
//
// Lock order, outermost first: refTable.move (see refs.go), then any one
// of Store.mu, refTable.mu and Session.mu, which are leaves: nothing else
// is locked, and nothing that blocks or calls back, while one is held.
// The package-local locks (localLock) are channels, taken before any etcd
// lock of the same package and never while a mutex is held.
type Store struct {
	cli  *clientv3.Client
	root string
	opt  options
	keys keys.Space // every etcd key, under opt.prefix
	pid  int
	sess *Session // the lease that references, locks and build records ride on
	refs refTable // references held by this store

	askWatch     sync.Once   // starts watchAsk at the first cached reference
	reconcileDue atomic.Bool // a ReconcileRefs is scheduled (reconcileSoon)

	mount   MountInfo   // the root's mount, checked by New (mount.go)
	created bool        // New made the root: it did not exist (binding.go)
	visible visibleMemo // published attempts this store has seen (visible.go)
	records recordMemo  // published records by revision, decoded once (visible.go)

	ctx    context.Context // ends at Close
	cancel context.CancelFunc
	wg     sync.WaitGroup // flights, background clean-up and uploads (see spawn)

	mu      sync.Mutex // a leaf; guards the fields below
	closed  bool
	flights map[string]*flight
	locals  map[string]*localLock

	// testHookCleanup, set only by tests before use, runs after a waiting
	// attempt saw a publish and released its callers, before it leaves the
	// lock queue.
	testHookCleanup func(id string)
	// testHookWait, likewise, runs when an attempt starts to wait, between
	// its read of the package's state and the start of its watches.
	testHookWait func(id string)
	// testHookUpload, likewise, runs in storeCache between taking the
	// upload's reference and starting the upload.
	testHookUpload func(id string)
	// testHookRetake runs before a reference whose key etcd deleted is
	// taken again.
	testHookRetake func(id string)
	// testHookInvalidate, likewise, runs after Invalidate read the
	// dependents and before its Txns.
	testHookInvalidate func(id string)
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
		return nil, fmt.Errorf("store options: %w", err)
	}
	abs, err := filepath.Abs(root)
	if err != nil {
		return nil, fmt.Errorf("root %q: %w", root, err)
	}
	s := &Store{
		cli:     cli,
		root:    abs,
		opt:     o,
		keys:    keys.Space{Prefix: o.prefix},
		pid:     os.Getpid(),
		refs:    refTable{held: make(map[string][]*ref), pending: make(map[string]struct{})},
		flights: make(map[string]*flight),
		locals:  make(map[string]*localLock),
	}
	if err := s.openRoot(ctx); err != nil {
		return nil, err
	}
	s.sess, err = NewSession(ctx, cli, SessionConfig{
		TTL: o.ttl, OpTimeout: o.opTimeout, Logger: o.logger,
		OnLost: func(cause error) {
			s.opt.logger.Warn("builds on the lost lease are cancelled; references are being taken again", "why", cause)
			s.emit(Event{Kind: EventLeaseLost, Err: cause})
		},
		OnRestored: func() { s.emit(Event{Kind: EventLeaseRestored}) },
	})
	if err != nil {
		return nil, err
	}
	s.sess.OnRenew(s.retakeRefs)
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s, nil
}

// Root returns the absolute path of the shared root.
func (s *Store) Root() string { return s.root }

// CreatedRoot reports whether New created the root directory, which it
// does only for a prefix's first root (or with WithInitRoot). A root this
// host could not see at first but found by looking again was not created.
func (s *Store) CreatedRoot() bool { return s.created }

// Client returns the etcd client the store uses.
func (s *Store) Client() *clientv3.Client { return s.cli }

// Prefix returns the etcd key prefix.
func (s *Store) Prefix() string { return s.opt.prefix }

// Lease returns the ID of the store's current lease, or 0 while a new one is
// being made.
func (s *Store) Lease() clientv3.LeaseID { return s.sess.ID() }

// Session returns the lease the store's references, locks and build
// records ride on.
func (s *Store) Session() *Session { return s.sess }

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
//  3. background work (clean-up of trash) stops, and uploads to the
//     remote cache that are under way finish (each bounded by the cache's
//     own deadlines);
//  4. the session closes: the lease is revoked, so this store's references
//     and locks drop at once instead of after the TTL.
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
	s.mu.Unlock()

	s.cancel()
	s.wg.Wait()
	return s.sess.Close()
}

// spawn runs fn in a goroutine that Close waits for, unless the store is
// closed (then it reports false and does not run fn). It is the only place
// that adds to s.wg, so no goroutine starts after Close began to wait.
func (s *Store) spawn(fn func()) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		fn()
	}()
	return true
}

// opCtx bounds one etcd call: a deadline, and fail fast without a leader.
func (s *Store) opCtx(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(clientv3.WithRequireLeader(ctx), s.opt.opTimeout)
}

// Keys and paths.

func (s *Store) pkgsDir() string            { return paths.Pkgs(s.root) }
func (s *Store) trashDir() string           { return paths.Trash(s.root) }
func (s *Store) pkgDir(id string) string    { return paths.PkgDir(s.root, id) }
func (s *Store) outputDir(id string) string { return paths.Contents(s.root, id) }
func (s *Store) logDir(id string) string    { return paths.Logs(s.root, id) }

// deleteLater deletes key in the background, retrying until it succeeds or
// the store closes (when the lease revocation takes the key with it). It is
// how a release that failed because etcd was unreachable is finished.
func (s *Store) deleteLater(key string) {
	s.spawn(func() {
		b := backoff.WithContext(backoff.NewExponentialBackOff(backoff.WithMaxElapsedTime(0), backoff.WithMaxInterval(5*time.Second)), s.ctx)
		backoff.Retry(func() error { //nolint:errcheck // ends only by success or close
			ctx, cancel := s.opCtx(s.ctx)
			defer cancel()
			_, err := s.cli.Delete(ctx, key)
			return err
		}, b)
	})
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
