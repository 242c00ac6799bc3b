//go:build !linux

package etcdstore

import (
	"os"
	"time"
)

// syncTree flushes the directory itself; other systems have no syncfs.
func syncTree(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	return f.Sync()
}

// ctime is the modification time of fi here; Linux uses the change time.
func ctime(fi os.FileInfo) time.Time { return fi.ModTime() }
