package etcdstore

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// The binding goes both ways:
//
//   - the root records, in <root>/.granary/cluster, the etcd cluster and
//     prefix it serves and its own random identity (root ID);
//   - etcd records, at P/root, the identity of the prefix's shared root.
//
// A store refuses a root bound to another cluster or prefix
// (ErrForeignCluster), and a root that is not the prefix's shared root
// (ErrNotSharedRoot): on a farm, an empty or missing root on a prefix that
// already has one is a host whose shared volume is not mounted, and using it
// would hand out packages that are not there.
//
// The binding file is made with an exclusive create (no hard links needed),
// mode 0644 so every user who can read the root can read it; a reader that
// finds it empty or half written reads it again.

// binding is the content of <root>/.granary/cluster.
type binding struct {
	ClusterID string    `json:"cluster_id"`
	Prefix    string    `json:"prefix"`
	RootID    string    `json:"root_id,omitempty"`
	BoundAt   time.Time `json:"bound_at"`
}

// RootRecord is the value of P/root: the identity of the prefix's shared
// root, and who bound it.
type RootRecord struct {
	RootID  string    `json:"root_id"`
	Host    string    `json:"host"`
	Path    string    `json:"path"`
	BoundAt time.Time `json:"bound_at"`
}

// WithInitRoot(true) lets New make the root the prefix's shared root even
// though the prefix already has another one (a new, empty volume replacing
// the old). Without it, New refuses such a root with ErrNotSharedRoot. It
// is never needed for the first root of a prefix.
func WithInitRoot(init bool) Option { return func(o *options) { o.initRoot = init } }

func (s *Store) bindingPath() string { return filepath.Join(s.root, ".granary", "cluster") }

// openRoot checks the root against etcd and binds it if it is new, then
// makes the store's directories. It is the part of New that touches the
// shared root.
func (s *Store) openRoot(ctx context.Context) error {
	cluster, shared, sharedRev, err := s.sharedRoot(ctx)
	if err != nil {
		return err
	}
	notShared := func(what string, waited time.Duration) error {
		return &NotSharedRootError{Root: s.root, What: what, Cluster: cluster, Prefix: s.opt.prefix, Shared: *shared, Waited: waited}
	}
	// mustBeShared: this root must be the prefix's shared root already.
	mustBeShared := shared != nil && !s.opt.initRoot
	if mustBeShared {
		// etcd says the prefix has a shared root: if this host cannot see
		// one here, that may be its cache (a negative entry from before
		// the root was made), so look again before refusing.
		if err := s.awaitRoot(ctx, shared); err != nil {
			var miss *rootMissing
			if errors.As(err, &miss) {
				return notShared(miss.Error(), miss.waited)
			}
			return err
		}
	}
	if err := s.makeRoot(mustBeShared, notShared); err != nil {
		return err
	}
	b, err := s.openBinding(cluster, mustBeShared, notShared)
	if err != nil {
		return err
	}
	if b.ClusterID != cluster || b.Prefix != s.opt.prefix {
		return fmt.Errorf("%w: %s is bound to etcd cluster %s with prefix %q (since %s), but this client reaches cluster %s with prefix %q; "+
			"point --endpoints at the members of cluster %s, or use another root for this cluster",
			ErrForeignCluster, s.root, b.ClusterID, b.Prefix, b.BoundAt.Format(time.RFC3339), cluster, s.opt.prefix, b.ClusterID)
	}
	switch {
	case shared != nil && shared.RootID == b.RootID:
	case mustBeShared:
		return notShared(fmt.Sprintf("%s has root ID %s", s.root, b.RootID), 0)
	default:
		if err := s.claimPrefix(ctx, b, sharedRev); err != nil {
			return err
		}
	}
	for _, d := range []string{s.pkgsDir(), s.trashDir()} {
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
			return fmt.Errorf("prepare root: %w", err)
		}
	}
	s.checkMount()
	return nil
}

// sharedRoot reads the prefix's shared root from etcd: the cluster's ID,
// the root's record (nil if the prefix has none yet) and its revision.
func (s *Store) sharedRoot(ctx context.Context) (cluster string, shared *RootRecord, rev int64, err error) {
	cctx, cancel := s.opCtx(ctx)
	resp, err := s.cli.Get(cctx, s.keys.RootKey())
	cancel()
	if err != nil {
		return "", nil, 0, fmt.Errorf("cannot reach etcd at %v within %v: %w", s.cli.Endpoints(), s.opt.opTimeout, err)
	}
	cluster = strconv.FormatUint(resp.Header.ClusterId, 16)
	if len(resp.Kvs) > 0 {
		if shared, err = decode[RootRecord](resp.Kvs[0].Value); err != nil {
			return "", nil, 0, fmt.Errorf("shared root record %s: %w", s.keys.RootKey(), err)
		}
		rev = resp.Kvs[0].ModRevision
	}
	return cluster, shared, rev, nil
}

// makeRoot checks that the root is a directory, creating it unless it
// must be the shared root already (mustBeShared).
func (s *Store) makeRoot(mustBeShared bool, notShared func(string, time.Duration) error) error {
	switch fi, err := os.Stat(s.root); {
	case errors.Is(err, fs.ErrNotExist):
		if mustBeShared {
			return notShared(s.root+" does not exist", 0) // gone since awaitRoot saw it
		}
		s.opt.logger.Warn("the shared root does not exist; creating it", "root", s.root)
		if err := os.MkdirAll(s.root, 0o755); err != nil {
			return fmt.Errorf("create root: %w", err)
		}
		s.created = true
	case err != nil:
		return fmt.Errorf("root: %w", err)
	case !fi.IsDir():
		return fmt.Errorf("root %s is not a directory", s.root)
	}
	return nil
}

// openBinding reads the root's binding, creating it for cluster unless the
// root must be the shared root already (mustBeShared).
func (s *Store) openBinding(cluster string, mustBeShared bool, notShared func(string, time.Duration) error) (*binding, error) {
	b, err := readBinding(s.bindingPath())
	switch {
	case errors.Is(err, fs.ErrNotExist):
		if mustBeShared {
			return nil, notShared(s.root+" is not bound (empty, or never used)", 0) // gone since awaitRoot saw it
		}
		return s.createBinding(cluster)
	case err != nil:
		return nil, fmt.Errorf("root binding: %w", err)
	default:
		// Older bindings were 0600: a job running as another user could
		// not open the store. Widen it if it is ours.
		if fi, err := os.Stat(s.bindingPath()); err == nil && fi.Mode().Perm()&0o044 != 0o044 {
			os.Chmod(s.bindingPath(), fi.Mode().Perm()|0o044) //nolint:errcheck // best effort: only the owner may
		}
	}
	return b, nil
}

// rootMissing says that this host cannot see the shared root, or its
// binding, where etcd says the prefix has one.
type rootMissing struct {
	what   string        // "<root> does not exist", "<root> is not bound …"
	waited time.Duration // how long this host looked again; 0 if it did not
}

func (e *rootMissing) Error() string { return e.what }

// rootNow says whether this host sees the root and its binding, as its
// cache has them: nil when it does, or when something other than a missing
// file is wrong (openRoot reports that), else a *rootMissing.
func (s *Store) rootNow() error {
	if _, err := os.Stat(s.root); errors.Is(err, fs.ErrNotExist) {
		return &rootMissing{what: s.root + " does not exist"}
	}
	if _, err := os.Stat(s.bindingPath()); errors.Is(err, fs.ErrNotExist) {
		return &rootMissing{what: s.root + " is not bound (empty, or never used)"}
	}
	return nil
}

// lookRoot is rootNow after revalidating the root's ancestors, the root
// and its .granary, in that order: on NFS, opening a directory drops its
// cached entries, negative ones included, if it changed on the server.
func (s *Store) lookRoot() error {
	var dirs []string
	for d := filepath.Dir(s.root); ; d = filepath.Dir(d) {
		dirs = append([]string{d}, dirs...)
		if d == filepath.Dir(d) {
			break
		}
	}
	revalidate(append(dirs, s.root, filepath.Dir(s.bindingPath()))...)
	return s.rootNow()
}

// awaitRoot returns once this host sees the root and its binding, which
// etcd says exist (shared). On a local file system the first look decides;
// on any other (NFS, FUSE, unknown), where a host may cache "no such file"
// for a while after another host made the file, it looks again with back-off
// up to the visibility timeout (awaitSeen: logged, and EventWaitRoot sent
// once) and then returns a *rootMissing saying how long it waited; a missing
// volume on a network file system is refused that much later. It fails
// early only when ctx ends.
func (s *Store) awaitRoot(ctx context.Context, shared *RootRecord) error {
	why := s.rootNow() // what the cache says is enough when it says yes
	if why == nil {
		return nil
	}
	if fstype := fsTypeOf(s.root); localFS(fstype) {
		return why
	}
	start := time.Now()
	why, err := s.awaitSeen(ctx, why, sight{
		waiting: "waiting for the shared root to become visible on this host: etcd says the prefix has one",
		seen:    "the shared root is visible",
		attrs:   []any{"root", s.root, "root_id", shared.RootID, "bound_by", shared.Host},
		look:    s.lookRoot,
		started: func(why error, timeout time.Duration) {
			s.emit(Event{Kind: EventWaitRoot, Host: shared.Host, Since: shared.BoundAt, Elapsed: timeout, Err: why})
		},
	})
	switch {
	case err != nil:
		return fmt.Errorf("waiting for the shared root %s to become visible (%v): %w", s.root, why, err)
	case why != nil:
		var miss *rootMissing
		if errors.As(why, &miss) {
			miss.waited = time.Since(start).Round(time.Millisecond)
		}
		return why
	}
	return nil
}

// claimPrefix records b's root as the prefix's shared root: when there is
// none (rev 0), or, with WithInitRoot, in place of the one read at rev.
func (s *Store) claimPrefix(ctx context.Context, b *binding, rev int64) error {
	rec := RootRecord{RootID: b.RootID, Host: s.opt.host, Path: s.root, BoundAt: time.Now().UTC()}
	cctx, cancel := s.opCtx(ctx)
	defer cancel()
	resp, err := s.cli.Txn(cctx).
		// Only over the record we read: two hosts binding at once must
		// not both win, and an init must not replace a newer init.
		If(clientv3.Compare(clientv3.ModRevision(s.keys.RootKey()), "=", rev)).
		Then(clientv3.OpPut(s.keys.RootKey(), mustJSON(rec))).
		Else(clientv3.OpGet(s.keys.RootKey())).
		Commit()
	if err != nil {
		return fmt.Errorf("record the shared root in etcd: %w", err)
	}
	if resp.Succeeded {
		if rev != 0 {
			s.opt.logger.Warn("this root is now the prefix's shared root", "root", s.root, "root_id", b.RootID)
		}
		return nil
	}
	// Someone else recorded a root first: fine if it is this one (another
	// host binding the same fresh root at the same moment).
	kvs := resp.Responses[0].GetResponseRange().Kvs
	if len(kvs) > 0 {
		if got, err := decode[RootRecord](kvs[0].Value); err == nil && got.RootID == b.RootID {
			return nil
		}
	}
	return fmt.Errorf("%w: another root was recorded for prefix %q while this one (%s) was being bound; try again",
		ErrNotSharedRoot, s.opt.prefix, s.root)
}

// createBinding writes a new binding with a fresh root ID, or returns the
// one another host wrote first.
func (s *Store) createBinding(cluster string) (*binding, error) {
	if err := os.Mkdir(filepath.Dir(s.bindingPath()), 0o755); err != nil && !errors.Is(err, fs.ErrExist) {
		return nil, fmt.Errorf("bind root: %w", err)
	}
	var rnd [16]byte
	rand.Read(rnd[:])
	b := &binding{ClusterID: cluster, Prefix: s.opt.prefix, RootID: hex.EncodeToString(rnd[:]), BoundAt: time.Now().UTC()}
	data, _ := json.MarshalIndent(b, "", "  ")
	f, err := os.OpenFile(s.bindingPath(), os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if errors.Is(err, fs.ErrExist) {
		got, err := readBinding(s.bindingPath())
		if err != nil {
			return nil, fmt.Errorf("root binding: %w", err)
		}
		return got, nil
	}
	if err != nil {
		return nil, fmt.Errorf("bind root: %w", err)
	}
	_, werr := f.Write(append(data, '\n'))
	serr := f.Sync()
	cerr := f.Close()
	if err := errors.Join(werr, serr, cerr); err != nil {
		os.Remove(s.bindingPath())
		return nil, fmt.Errorf("bind root: %w", err)
	}
	// Readable by every user who can read the root, whatever the umask.
	os.Chmod(s.bindingPath(), 0o644) //nolint:errcheck // a stricter mode is reported by the readers that cannot read it
	s.opt.logger.Info("bound the root", "root", s.root, "cluster", cluster, "prefix", s.opt.prefix, "root_id", b.RootID)
	return b, nil
}

// partialRetry bounds how long a reader waits for a binding that another
// host is writing (created but not yet written).
const partialRetry = 5 * time.Second

// readBinding reads the binding at path, reading again while it is empty or
// half written. A binding of an older Granary, without a root ID, gets one
// derived from its content, the same on every host.
func readBinding(path string) (*binding, error) {
	deadline := time.Now().Add(partialRetry)
	wait := 10 * time.Millisecond
	for {
		data, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		var b binding
		err = json.Unmarshal(data, &b)
		if err == nil && b.ClusterID != "" && b.Prefix != "" {
			if b.RootID == "" {
				sum := sha256.Sum256(data)
				b.RootID = "legacy-" + hex.EncodeToString(sum[:8])
			}
			return &b, nil
		}
		if time.Now().After(deadline) {
			return nil, fmt.Errorf("%s is corrupt or incomplete after %v (%q); if no other cluster uses this root, delete the file", path, partialRetry, data)
		}
		time.Sleep(wait)
		wait = min(2*wait, 500*time.Millisecond)
	}
}
