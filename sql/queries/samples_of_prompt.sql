-- `toa tree`: the samples the tree's nodes point to.
SELECT * FROM samples WHERE prompt_id = ? AND method = ?
