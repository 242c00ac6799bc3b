package node_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/client/pkg/v3/testutil"
	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/etcdstore"
	"github.com/granary-build/granary/etcdstore/cache"
	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		os.Exit(childMain())
	}
	testutil.MustTestMainWithLeakDetection(m)
}

// testConfig is a node of srv with a fresh root and state directory.
func testConfig(t *testing.T, srv *etcdtest.Server, root string) node.Config {
	t.Helper()
	cfg := node.DefaultConfig()
	cfg.Endpoints = []string{srv.Endpoint}
	cfg.Root = root
	cfg.StateDir = t.TempDir()
	cfg.Name = "node-a"
	cfg.GCInterval = 0
	cfg.IdleTimeout = 0
	return cfg
}

// startNode runs n until the returned stop is called; stop returns Run's
// error. Cleanup stops it too.
func startNode(t *testing.T, cfg node.Config) (*node.Node, func() error) {
	t.Helper()
	return startNodeLog(t, cfg, nil)
}

// startNodeLog is startNode with a logger.
func startNodeLog(t *testing.T, cfg node.Config, log *slog.Logger) (*node.Node, func() error) {
	t.Helper()
	n, err := node.New(context.Background(), cfg, log)
	if err != nil {
		t.Fatalf("node.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	var stopped bool
	var runErr error
	stop := func() error {
		if !stopped {
			stopped = true
			cancel()
			runErr = <-done
		}
		return runErr
	}
	t.Cleanup(func() { stop() })
	return n, stop
}

// observer is a store of another host on srv.
func observer(t *testing.T, srv *etcdtest.Server, root string, opts ...etcdstore.Option) *etcdstore.Store {
	t.Helper()
	cli := srv.Client(t)
	opts = append([]etcdstore.Option{etcdstore.WithHost("observer"), etcdstore.WithTTL(3 * time.Second)}, opts...)
	s, err := etcdstore.New(context.Background(), cli, root, opts...)
	if err != nil {
		t.Fatalf("etcdstore.New: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func writeFile(name, data string) func(ctx context.Context) error {
	return func(ctx context.Context) error { return os.WriteFile(name, []byte(data), 0o644) }
}

func build(t *testing.T, s *etcdstore.Store, id string) {
	t.Helper()
	h := s.Handle(id)
	if err := h.BuildContext(context.Background(), writeFile(filepath.Join(h.OutputDirectory(), "f"), id)); err != nil {
		t.Fatalf("build %s: %v", id, err)
	}
}

func TestShutdownRevokesLease(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cfg := testConfig(t, srv, root)
	n, stop := startNode(t, cfg)
	obs := observer(t, srv, root)

	h := n.Store().Handle("pkg")
	if _, err := n.Build(context.Background(), "pkg", writeFile(filepath.Join(h.OutputDirectory(), "f"), "x")); err != nil {
		t.Fatalf("Build: %v", err)
	}
	if err := h.IncRefContext(context.Background()); err != nil {
		t.Fatalf("IncRef: %v", err)
	}
	info, err := obs.Inspect(context.Background(), "pkg")
	if err != nil || len(info.Refs) != 1 {
		t.Fatalf("before shutdown: refs = %v, err %v; want 1 ref", info.Refs, err)
	}
	if ok, err := obs.Handle("pkg").TryRemoveContext(context.Background()); ok || err != nil {
		t.Fatalf("TryRemove while the node holds a ref = %v, %v; want false, nil", ok, err)
	}
	regs, err := node.ReadRegistrations(context.Background(), obs.Client(), cfg.Prefix)
	if err != nil || len(regs) != 1 || regs[0].Name != "node-a" {
		t.Fatalf("registrations = %+v, %v; want node-a", regs, err)
	}

	if err := stop(); err != nil {
		t.Fatalf("Run = %v, want nil after cancel", err)
	}

	// The TTL is 15s; nothing waits for it: the refs must be gone now.
	info, err = obs.Inspect(context.Background(), "pkg")
	if err != nil || len(info.Refs) != 0 {
		t.Fatalf("after shutdown: refs = %v, err %v; want none", info.Refs, err)
	}
	regs, err = node.ReadRegistrations(context.Background(), obs.Client(), cfg.Prefix)
	if err != nil || len(regs) != 0 {
		t.Fatalf("registrations after shutdown = %+v, %v; want none", regs, err)
	}
	if ok, err := obs.Handle("pkg").TryRemoveContext(context.Background()); !ok || err != nil {
		t.Fatalf("TryRemove after shutdown = %v, %v; want true, nil", ok, err)
	}
}

func TestMetricsAndHealth(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := testConfig(t, srv, t.TempDir())
	cfg.ListenMetrics = "127.0.0.1:0"
	n, _ := startNode(t, cfg)
	h := n.Store().Handle("m")
	if _, err := n.Build(context.Background(), "m", writeFile(filepath.Join(h.OutputDirectory(), "f"), "x")); err != nil {
		t.Fatalf("Build: %v", err)
	}
	if _, err := n.GC(context.Background()); err != nil {
		t.Fatalf("GC: %v", err)
	}

	get := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + n.MetricsAddr() + path)
		if err != nil {
			t.Fatalf("GET %s: %v", path, err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, p := range []string{"/healthz", "/readyz"} {
		if code, body := get(p); code != http.StatusOK {
			t.Errorf("GET %s = %d %q, want 200", p, code, body)
		}
	}
	code, body := get("/metrics")
	if code != http.StatusOK {
		t.Fatalf("GET /metrics = %d", code)
	}
	for _, want := range []string{
		`granary_builds_total{result="built"} 1`,
		`granary_builds_total{result="failed"} 0`,
		"granary_build_duration_seconds_count 1",
		"granary_wait_duration_seconds_count 0",
		"granary_refs_held 0",
		"granary_packages_available 1",
		"granary_builds_in_progress 0",
		`granary_gc_sweeps_total{result="ok"} 1`,
		"granary_gc_removals_total 0",
		"granary_gc_removed_bytes_total 0",
		"granary_lease_losses_total 0",
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
}

func TestGCLoopRemovesUnusedSparesReferenced(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	obs := observer(t, srv, root)
	build(t, obs, "old")
	build(t, obs, "held")
	if err := obs.Handle("held").IncRefContext(context.Background()); err != nil {
		t.Fatalf("IncRef: %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	removed := make(chan string, 10)
	cfg := testConfig(t, srv, root)
	cfg.GCInterval = 50 * time.Millisecond
	cfg.GC = etcdstore.PruneOptions{OlderThan: time.Nanosecond, Grace: -1}
	cfg.Events = func(e etcdstore.Event) {
		if e.Kind == etcdstore.EventRemoved {
			select {
			case removed <- e.ID:
			default:
			}
		}
	}
	startNode(t, cfg)

	// EventRemoved comes once the package is gone from etcd and its tree
	// is in the trash.
	select {
	case id := <-removed:
		if id != "old" {
			t.Fatalf("the GC loop removed %q, want only \"old\"", id)
		}
	case <-ctx.Done():
		t.Fatal("the GC loop did not remove the unreferenced package")
	}
	if info, err := obs.Inspect(context.Background(), "old"); err != nil || info.State != etcdstore.StateAbsent {
		t.Errorf("old: state %v, err %v; want absent", info.State, err)
	}
	if _, err := os.Stat(obs.Handle("old").OutputDirectory()); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("old: directory still there (%v)", err)
	}
	// The loop has swept at least once more by the time "old" is gone; the
	// referenced package must have survived every sweep.
	info, err := obs.Inspect(context.Background(), "held")
	if err != nil || info.State != etcdstore.StateAvailable {
		t.Fatalf("held: state %v, err %v; want available", info.State, err)
	}
	if _, err := os.Stat(filepath.Join(obs.Handle("held").OutputDirectory(), "f")); err != nil {
		t.Fatalf("held: %v", err)
	}
}

func TestNodeCacheMetrics(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := testConfig(t, srv, t.TempDir())
	cacheDir := t.TempDir()
	cfg.Cache = "file://" + cacheDir
	cfg.ListenMetrics = "127.0.0.1:0"
	stored := make(chan etcdstore.Event, 1)
	cfg.Events = func(e etcdstore.Event) {
		if e.Kind == etcdstore.EventCacheStored || e.Kind == etcdstore.EventCacheUploadFailed {
			stored <- e
		}
	}
	n, _ := startNode(t, cfg)
	h := n.Store().Handle("c")
	if _, err := n.Build(context.Background(), "c", writeFile(filepath.Join(h.OutputDirectory(), "f"), "cached")); err != nil {
		t.Fatalf("Build: %v", err)
	}
	select {
	case e := <-stored:
		if e.Kind != etcdstore.EventCacheStored {
			t.Fatalf("upload: %v (%v)", e.Kind, e.Err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no upload within 30s")
	}
	if _, err := os.Stat(filepath.Join(cacheDir, "c.tar.zst")); err != nil {
		t.Fatalf("the node's store did not fill the cache: %v", err)
	}
	resp, err := http.Get("http://" + n.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	body := string(b)
	for _, want := range []string{
		"granary_cache_hits_total 0", "granary_cache_misses_total 1", "granary_cache_fetch_errors_total 0",
		"granary_cache_uploads_total 1", "granary_cache_upload_failures_total 0",
		`granary_cache_bytes_total{direction="down"} 0`,
	} {
		if !strings.Contains(body, want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if !strings.Contains(body, `granary_cache_bytes_total{direction="up"} `) || strings.Contains(body, `granary_cache_bytes_total{direction="up"} 0`+"\n") {
		t.Errorf("/metrics counts no bytes up")
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", body)
	}
}

// trustedKey is a public key in the format of 'granary cache keygen'.
const trustedKey = "farm-1:sxJKZHjT5ojytCo41HyETZQd+EgxGu4oMxzIQobnhAQ="

// TestNodeCacheRejectedMetric: with trusted keys, an unsigned entry in the
// cache is built instead and counted by reason in /metrics.
func TestNodeCacheRejectedMetric(t *testing.T) {
	srv := etcdtest.Start(t)
	cfg := testConfig(t, srv, t.TempDir())
	cacheDir := t.TempDir()
	cfg.Cache = "file://" + cacheDir
	cfg.CacheTrustedKeys = trustedKey
	cfg.ListenMetrics = "127.0.0.1:0"
	// Another host, without a signing key, put "c" in the cache.
	src := t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "f"), []byte("from a host without the key"), 0o644); err != nil {
		t.Fatal(err)
	}
	d, size, err := etcdstore.TreeDigest(src)
	if err != nil {
		t.Fatal(err)
	}
	unsigned, err := cache.NewDir(cacheDir)
	if err != nil {
		t.Fatal(err)
	}
	if err := unsigned.Store(context.Background(), "c", src, etcdstore.PackageRecord{Digest: d, Size: size}); err != nil {
		t.Fatal(err)
	}
	n, _ := startNode(t, cfg)
	h := n.Store().Handle("c")
	ran := 0
	if _, err := n.Build(context.Background(), "c", func(ctx context.Context) error {
		ran++
		return writeFile(filepath.Join(h.OutputDirectory(), "f"), "built here")(ctx)
	}); err != nil {
		t.Fatalf("Build: %v", err)
	}
	if ran != 1 {
		t.Errorf("builder ran %d times, want once: the unsigned entry must be refused", ran)
	}
	resp, err := http.Get("http://" + n.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`granary_cache_rejected_total{reason="unsigned"} 1`, `granary_cache_rejected_total{reason="bad_signature"} 0`,
		"granary_cache_hits_total 0", "granary_cache_fetch_errors_total 0",
	} {
		if !strings.Contains(string(b), want+"\n") {
			t.Errorf("/metrics lacks %q", want)
		}
	}
}

func TestConfigValidate(t *testing.T) {
	base := func() node.Config {
		c := node.DefaultConfig()
		c.Root = "/srv/granary"
		c.StateDir = "/var/lib/granary"
		return c
	}
	tests := []struct {
		name string
		mod  func(*node.Config)
		want string // "" = valid
	}{
		{"defaults", func(*node.Config) {}, ""},
		{"endpoints", func(c *node.Config) { c.Endpoints = []string{"https://e1:2379", "e2:2379"} }, ""},
		{"bad endpoint", func(c *node.Config) { c.Endpoints = []string{"e1"} }, `endpoint "e1"`},
		{"short ttl", func(c *node.Config) { c.TTL = time.Second }, "TTL 1s"},
		{"bad prefix", func(c *node.Config) { c.Prefix = "granary" }, "prefix"},
		{"cert without key", func(c *node.Config) { c.Cert = "c.pem" }, "--cert and --key"},
		{"password without user", func(c *node.Config) { c.Password = "x" }, "without --user"},
		{"state inside root", func(c *node.Config) { c.StateDir = "/srv/granary/state" }, "inside the shared root"},
		{"long socket", func(c *node.Config) { c.StateDir = "/" + strings.Repeat("s", 100) }, "too long for a unix socket"},
		{"relative state", func(c *node.Config) { c.StateDir = "state" }, "absolute"},
		{"http cache", func(c *node.Config) { c.Cache = "https://cache.example/granary/" }, ""},
		{"cache scheme", func(c *node.Config) { c.Cache = "gs://bucket/x" }, `unsupported scheme "gs"`},
		{"s3 cache", func(c *node.Config) { c.Cache = "s3://bucket/x?endpoint=http://127.0.0.1:8333" }, ""},
		{"s3 cache bad parameter", func(c *node.Config) { c.Cache = "s3://bucket/x?acl=public" }, `unknown parameter "acl"`},
		{"trusted keys", func(c *node.Config) { c.Cache = "https://c/"; c.CacheTrustedKeys = trustedKey }, ""},
		{"bad trusted key", func(c *node.Config) { c.Cache = "https://c/"; c.CacheTrustedKeys = "farm:xyz" }, "bad key"},
		{"empty trusted keys", func(c *node.Config) { c.Cache = "https://c/"; c.CacheTrustedKeys = " , " }, "list no key"},
		{"sign key missing", func(c *node.Config) { c.Cache = "https://c/"; c.CacheSignKey = "/no/such/key" }, "signing key"},
		{"trusted keys without cache", func(c *node.Config) { c.CacheTrustedKeys = trustedKey }, "without a cache URL"},
		{"negative fetch budget", func(c *node.Config) { c.Cache = "https://c/"; c.CacheFetchBudget = -time.Second }, "fetch budget"},
		{"cache dir missing", func(c *node.Config) { c.Cache = "file:///definitely/not/there" }, "cache directory"},
		{"cache token without cache", func(c *node.Config) { c.CacheToken = "t" }, "without a cache URL"},
		{"cache CA missing", func(c *node.Config) { c.Cache = "https://c/"; c.CacheCACert = "/no/such/ca.pem" }, "cache CA file"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := base()
			tt.mod(&c)
			err := c.Validate()
			switch {
			case tt.want == "" && err != nil:
				t.Fatalf("Validate = %v, want nil", err)
			case tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)):
				t.Fatalf("Validate = %v, want error containing %q", err, tt.want)
			}
		})
	}
}

func TestFromEnv(t *testing.T) {
	env := map[string]string{
		"GRANARY_ROOT": "/r", "GRANARY_ENDPOINTS": "a:1, b:2", "GRANARY_TTL": "7",
		"GRANARY_PREFIX": "/p/", "GRANARY_USER": "u", "GRANARY_PASSWORD": "pw", "GRANARY_HOST": "h",
		"GRANARY_CACHE": "https://c/", "GRANARY_CACHE_TOKEN": "tok", "GRANARY_CACHE_CACERT": "/ca.pem",
		"GRANARY_CACHE_SIGN_KEY": "/k.sec", "GRANARY_CACHE_TRUSTED_KEYS": trustedKey, "GRANARY_CACHE_FETCH_BUDGET": "20",
	}
	c := node.DefaultConfig()
	if err := c.FromEnv(func(k string) string { return env[k] }); err != nil {
		t.Fatal(err)
	}
	if c.Root != "/r" || strings.Join(c.Endpoints, "|") != "a:1|b:2" || c.TTL != 7*time.Second ||
		c.Prefix != "/p/" || c.User != "u" || c.Password != "pw" || c.Name != "h" || c.Cache != "https://c/" || c.CacheToken != "tok" || c.CacheCACert != "/ca.pem" ||
		c.CacheSignKey != "/k.sec" || c.CacheTrustedKeys != trustedKey || c.CacheFetchBudget != 20*time.Second {
		t.Fatalf("FromEnv gave %+v", c)
	}
	if err := c.FromEnv(func(k string) string {
		if k == "GRANARY_TTL" {
			return "soon"
		}
		return ""
	}); err == nil {
		t.Fatal("FromEnv accepted GRANARY_TTL=soon")
	}
}

// embeddedConfig is a node of its own embedded etcd, with a short state
// directory (the socket path is limited) removed at the end.
func embeddedConfig(t *testing.T) node.Config {
	t.Helper()
	state, err := os.MkdirTemp("", "gn")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	cfg := node.DefaultConfig()
	cfg.Root = t.TempDir()
	cfg.StateDir = state
	cfg.GCInterval = 0
	return cfg
}

func TestEmbeddedNode(t *testing.T) {
	cfg := embeddedConfig(t)
	state := cfg.StateDir
	n, stop := startNode(t, cfg)
	if n.Client().Endpoints()[0] != "unix://"+filepath.Join(state, "etcd.sock") {
		t.Errorf("endpoint %v, want the state dir socket", n.Client().Endpoints())
	}

	l, err := node.ReadLocal(state)
	if err != nil {
		t.Fatalf("ReadLocal: %v", err)
	}
	if l.PID != os.Getpid() || l.Socket != cfg.SocketPath() {
		t.Errorf("Local = %+v", l)
	}
	if _, err := node.New(context.Background(), cfg, nil); !errors.Is(err, node.ErrNodeRunning) {
		t.Errorf("second node on the state dir: err = %v, want ErrNodeRunning", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("Run = %v", err)
	}
	if _, err := node.ReadLocal(state); !errors.Is(err, node.ErrNoLocalNode) {
		t.Errorf("after stop: ReadLocal err = %v, want ErrNoLocalNode", err)
	}
}

func TestEmbeddedNodeExitsWhenIdle(t *testing.T) {
	cfg := embeddedConfig(t)
	state := cfg.StateDir
	cfg.IdleTimeout = 400 * time.Millisecond
	n, err := node.New(context.Background(), cfg, nil)
	if err != nil {
		t.Fatal(err)
	}
	// Nothing but the node's own leases: Run must end by itself, cleanly.
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := n.Run(ctx); err != nil {
		t.Fatalf("Run = %v, want nil after the idle period", err)
	}
	if ctx.Err() != nil {
		t.Fatal("Run ended only because the test gave up: the idle exit did not happen")
	}
	if _, err := node.ReadLocal(state); !errors.Is(err, node.ErrNoLocalNode) {
		t.Errorf("after idle exit: ReadLocal err = %v, want ErrNoLocalNode", err)
	}
}

// TestSameNameNodes: two nodes started with the same name keep separate
// registrations; stopping one leaves the other's.
func TestSameNameNodes(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	_, stopA := startNode(t, testConfig(t, srv, root))
	obs := observer(t, srv, root)
	count := func(want int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			regs, err := node.ReadRegistrations(context.Background(), obs.Client(), etcdstore.DefaultPrefix)
			if err == nil && len(regs) == want {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("registrations = %+v, %v; want %d", regs, err, want)
			}
		}
	}
	count(1)
	var logs syncBuffer
	_, stopB := startNodeLog(t, testConfig(t, srv, root), slog.New(slog.NewTextHandler(&logs, nil)))
	count(2)
	// The warning comes right after the registration lands.
	for deadline := time.Now().Add(10 * time.Second); !strings.Contains(logs.String(), "another live node has the same name"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no warning about the other node of the same name; logs:\n%s", logs.String())
		}
	}
	if err := stopA(); err != nil {
		t.Fatal(err)
	}
	count(1)
	if err := stopB(); err != nil {
		t.Fatal(err)
	}
	count(0)
}

// syncBuffer is a bytes.Buffer safe for a logger and a reader.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestDialNamesRefusedConnection: when etcd cannot be reached, Dial says
// why (here: nothing listens), for URL and host:port endpoints alike.
func TestDialNamesRefusedConnection(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	for _, ep := range []string{"http://" + addr, addr} {
		cfg := node.DefaultConfig()
		cfg.Endpoints = []string{ep}
		cfg.OpTimeout = 500 * time.Millisecond
		cfg.DialTimeout = 500 * time.Millisecond
		cli, err := node.Dial(context.Background(), &cfg)
		if err == nil {
			cli.Close()
			t.Fatalf("Dial %s succeeded", ep)
		}
		if !errors.Is(err, node.ErrUnreachable) || !strings.Contains(err.Error(), "connection refused") {
			t.Errorf("Dial %s = %v; want ErrUnreachable naming the refused connection", ep, err)
		}
	}
}

// TestRegistrationComesBack: when the registration's lease is revoked
// behind the node's back, its session makes a new lease and puts the
// registration back on it.
func TestRegistrationComesBack(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cfg := testConfig(t, srv, root)
	startNode(t, cfg)
	cli := observer(t, srv, root).Client()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	pfx := cfg.Prefix + "node/" + cfg.Name + "/"
	w := cli.Watch(ctx, pfx, clientv3.WithPrefix())
	var first *mvccpb.KeyValue
	for first == nil {
		resp, err := cli.Get(ctx, pfx, clientv3.WithPrefix())
		if err != nil {
			t.Fatal(err)
		}
		if len(resp.Kvs) > 0 {
			first = resp.Kvs[0]
			break
		}
		<-w // registered after we looked: look again
	}
	if _, err := cli.Revoke(ctx, clientv3.LeaseID(first.Lease)); err != nil {
		t.Fatal(err)
	}
	for wr := range w {
		for _, ev := range wr.Events {
			if ev.Type == clientv3.EventTypePut && ev.Kv.Lease != first.Lease {
				return // back, on a new lease
			}
		}
	}
	t.Fatalf("registration did not come back after its lease was revoked: %v", ctx.Err())
}

// TestDeadPredecessorDropped: a node of the same name that ran on this
// machine and is no longer running (killed: its registration lingers until
// its lease expires) is dropped by its successor, without the warning
// meant for two live nodes of one name.
func TestDeadPredecessorDropped(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cfg := testConfig(t, srv, root)
	cli := observer(t, srv, root).Client()
	ctx := context.Background()

	dead := exec.Command("true")
	if err := dead.Run(); err != nil {
		t.Fatal(err)
	}
	machine, _ := os.Hostname()
	reg := node.Registration{Name: cfg.Name, PID: dead.Process.Pid, Started: time.Now().Add(-time.Hour), Machine: machine}
	if !reg.Gone() {
		t.Fatalf("a registration of an exited process on this machine is not Gone")
	}
	lease, err := cli.Grant(ctx, 60)
	if err != nil {
		t.Fatal(err)
	}
	key := fmt.Sprintf("%snode/%s/%x", cfg.Prefix, cfg.Name, int64(lease.ID))
	val, _ := json.Marshal(reg)
	if _, err := cli.Put(ctx, key, string(val), clientv3.WithLease(lease.ID)); err != nil {
		t.Fatal(err)
	}
	w := cli.Watch(ctx, key)
	var logs syncBuffer
	startNodeLog(t, cfg, slog.New(slog.NewTextHandler(&logs, nil)))
	select {
	case <-w:
	case <-time.After(30 * time.Second):
		t.Fatal("the dead predecessor's registration was not dropped")
	}
	if strings.Contains(logs.String(), "another live node") {
		t.Errorf("warned about a dead predecessor as if it were live; logs:\n%s", logs.String())
	}
}

// TestMetricsAgreeWithEvents: what a node's Prometheus metrics count
// (builds published and failed) is what `granary events` shows for that
// node, from etcd.
func TestMetricsAgreeWithEvents(t *testing.T) {
	srv := etcdtest.Start(t)
	root := t.TempDir()
	cfg := testConfig(t, srv, root)
	cfg.ListenMetrics = "127.0.0.1:0"
	obs := observer(t, srv, root)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var mu sync.Mutex
	seen := map[string]int{} // kind → events by our node
	ready := make(chan struct{})
	watched := make(chan error, 1)
	go func() {
		watched <- obs.WatchCluster(ctx, 0, func(int64) { close(ready) }, func(ev etcdstore.ClusterEvent) error {
			if ev.Host == cfg.Name {
				mu.Lock()
				seen[ev.Kind]++
				mu.Unlock()
			}
			return nil
		})
	}()
	<-ready
	n, _ := startNode(t, cfg)
	for _, id := range []string{"ok1", "ok2"} {
		h := n.Store().Handle(id)
		if _, err := n.Build(ctx, id, writeFile(filepath.Join(h.OutputDirectory(), "f"), "x")); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := n.Build(ctx, "bad", func(context.Context) error { return errors.New("exit status 42") }); err == nil {
		t.Fatal("failing build succeeded")
	}

	resp, err := http.Get("http://" + n.MetricsAddr() + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	metric := func(result string) int {
		for _, line := range strings.Split(string(body), "\n") {
			var v float64
			if _, err := fmt.Sscanf(line, `granary_builds_total{result="`+result+`"} %g`, &v); err == nil {
				return int(v)
			}
		}
		return 0
	}
	want := map[string]int{etcdstore.ClusterPublished: metric("built"), etcdstore.ClusterFailed: metric("failed")}
	if want[etcdstore.ClusterPublished] != 2 || want[etcdstore.ClusterFailed] != 1 {
		t.Fatalf("metrics: built %d, failed %d; want 2 and 1\n%s", want[etcdstore.ClusterPublished], want[etcdstore.ClusterFailed], body)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		mu.Lock()
		got := map[string]int{etcdstore.ClusterPublished: seen[etcdstore.ClusterPublished], etcdstore.ClusterFailed: seen[etcdstore.ClusterFailed]}
		mu.Unlock()
		if got[etcdstore.ClusterPublished] == want[etcdstore.ClusterPublished] && got[etcdstore.ClusterFailed] == want[etcdstore.ClusterFailed] {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("events of %s: %v; metrics: %v", cfg.Name, got, want)
		}
	}
	cancel()
	<-watched
}
