// Module ids by order, not by a hash of each module's absolute path: the bundle is
// then the same wherever it is built, so CI can rebuild it and compare.
module.exports = {
  optimization: {
    moduleIds: 'natural',
    chunkIds: 'natural'
  }
};
