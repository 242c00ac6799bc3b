package etcdstore

import (
	"os"

	"golang.org/x/sys/unix"
)

// syncTree flushes the file system that holds dir (syncfs), so a tree is on
// the server before it is published.
func syncTree(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Syncfs(int(f.Fd()))
}
