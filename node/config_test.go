package node_test

import (
	"context"
	"errors"
	"flag"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/granary-build/granary/internal/etcdtest"
	"github.com/granary-build/granary/node"
)

// enableAuth turns on etcd authentication with a root user whose password
// is password (root may do everything, so the node needs no role set-up).
func enableAuth(t *testing.T, cli *clientv3.Client, password string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := cli.UserAdd(ctx, "root", password); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.UserGrantRole(ctx, "root", "root"); err != nil {
		t.Fatal(err)
	}
	if _, err := cli.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}
}

// TestPasswordFile runs the path of `granary serve --password-file F`:
// the CLI validates the configuration, then node.New validates it again
// and dials etcd with the password read from the file. Validate used to
// read the file into Password, so the second call refused "password given
// both in $GRANARY_PASSWORD and in a file".
func TestPasswordFile(t *testing.T) {
	srv := etcdtest.Start(t)
	enableAuth(t, srv.Client(t), "s3cret")
	pwFile := filepath.Join(t.TempDir(), "password")
	if err := os.WriteFile(pwFile, []byte("s3cret\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	cfg := testConfig(t, srv, t.TempDir())
	cfg.User = "root"
	cfg.PasswordFile = pwFile
	for i := range 3 {
		if err := cfg.Validate(); err != nil {
			t.Fatalf("Validate #%d: %v", i+1, err)
		}
	}
	if cfg.Password != "" {
		t.Errorf("Validate set Password to %q; the file is read when dialling", cfg.Password)
	}
	n, stop := startNode(t, cfg) // node.New validates once more
	if n.Config().Password != "" {
		t.Errorf("the node's configuration holds the password")
	}
	build(t, n.Store(), "pw-pkg")
	if err := stop(); err != nil {
		t.Fatalf("Run: %v", err)
	}

	// A wrong password in the file is refused by etcd, which shows the
	// file's content is what reaches etcd.
	if err := os.WriteFile(pwFile, []byte("wrong\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg.StateDir = t.TempDir()
	if n, err := node.New(context.Background(), cfg, nil); err == nil {
		n.Close()
		t.Fatal("node.New succeeded with a wrong password in the file")
	} else if !strings.Contains(err.Error(), "authentication failed") && !errors.Is(err, node.ErrPermission) {
		t.Errorf("node.New with a wrong password: %v; want an authentication error", err)
	}

	// Both a password and a file, a missing file, a file without a user.
	for _, tt := range []struct {
		name string
		mod  func(*node.Config)
		want string
	}{
		{"both", func(c *node.Config) { c.Password = "x" }, "password given both"},
		{"missing file", func(c *node.Config) { c.PasswordFile = filepath.Join(t.TempDir(), "nope") }, "password file"},
		{"no user", func(c *node.Config) { c.User = "" }, "without --user"},
	} {
		c := cfg
		tt.mod(&c)
		if err := c.Validate(); err == nil || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: Validate = %v, want an error containing %q", tt.name, err, tt.want)
		}
	}
}

// TestTTLOverflow: a TTL too large for a time.Duration is refused with the
// value as typed, from the environment and from the flag, instead of
// wrapping around into some other duration.
func TestTTLOverflow(t *testing.T) {
	for _, v := range []string{"99999999999", "9223372037", "-99999999999", "99999999999999999999"} {
		c := node.DefaultConfig()
		err := c.FromEnv(func(k string) string {
			if k == node.EnvTTL {
				return v
			}
			return ""
		})
		if err == nil || !strings.Contains(err.Error(), v) || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("GRANARY_TTL=%s: FromEnv = %v (TTL %v); want an out-of-range error naming %s", v, err, c.TTL, v)
		}

		c = node.DefaultConfig()
		fs := flag.NewFlagSet("serve", flag.ContinueOnError)
		fs.SetOutput(io.Discard)
		c.RegisterFlags(fs)
		err = fs.Parse([]string{"--ttl", v})
		if err == nil || !strings.Contains(err.Error(), v) || !strings.Contains(err.Error(), "out of range") {
			t.Errorf("--ttl %s: Parse = %v (TTL %v); want an out-of-range error naming %s", v, err, c.TTL, v)
		}
	}
	// The largest value that fits is taken as it is (Validate has the
	// final word on sensible TTLs).
	c := node.DefaultConfig()
	if err := c.FromEnv(func(k string) string {
		if k == node.EnvTTL {
			return "9223372036"
		}
		return ""
	}); err != nil || c.TTL != 9223372036*time.Second {
		t.Errorf("GRANARY_TTL=9223372036: TTL %v, %v", c.TTL, err)
	}
}
