package etcdstore_test

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/granary-build/granary/etcdstore"
)

func TestRemoveTreeReadOnly(t *testing.T) {
	root := filepath.Join(t.TempDir(), "pkg")
	sub := filepath.Join(root, "a", "b")
	if err := os.MkdirAll(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(sub, "f"), []byte("x"), 0o444); err != nil {
		t.Fatal(err)
	}
	for _, d := range []string{sub, filepath.Dir(sub), root} {
		os.Chmod(d, 0o555)
	}
	if err := etcdstore.RemoveTree(root); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Lstat(root); !os.IsNotExist(err) {
		t.Fatalf("tree still there: %v", err)
	}
}
