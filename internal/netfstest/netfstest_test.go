package netfstest_test

import (
	"errors"
	"io/fs"
	"os"
	"testing"

	"github.com/granary-build/granary/internal/netfstest"
)

// TestNegativeEntryIsCached checks that the NFS-like mounts really are
// independent caches: a name that host B looked up before host A created it
// stays missing on B (a negative entry), while the server and A see it.
func TestNegativeEntryIsCached(t *testing.T) {
	e := netfstest.Mount(t, netfstest.Config{Hosts: 2, Options: netfstest.NFSLike})
	if _, err := os.Stat(e.Path(1, "x")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("B: stat x before it exists: %v", err)
	}
	if err := os.WriteFile(e.Path(0, "x"), []byte("hi"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(e.Path(0, "x")); err != nil {
		t.Fatalf("A: %v", err)
	}
	if _, err := os.Stat(e.Dir + "/x"); err != nil {
		t.Fatalf("server: %v", err)
	}
	if _, err := os.Stat(e.Path(1, "x")); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("B sees x at once (err %v): the mounts share a cache, so multi-host tests would prove nothing", err)
	}
}

func TestNoHardLinks(t *testing.T) {
	e := netfstest.Mount(t, netfstest.Config{Hosts: 1, Options: netfstest.NFSLike, NoHardLinks: true})
	if err := os.WriteFile(e.Path(0, "a"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Link(e.Path(0, "a"), e.Path(0, "b")); err == nil {
		t.Fatal("link succeeded with disable_hardlink")
	}
}
